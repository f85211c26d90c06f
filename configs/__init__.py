"""The shipped configs (package data): `--config mnist` finds configs/mnist.yaml from any folder."""
