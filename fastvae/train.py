"""Train a VAE.

    python -m fastvae.train --config configs/mnist.yaml [key=value ...]
    accelerate launch -m fastvae.train --config configs/mnist.yaml [key=value ...]
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \
        -m fastvae.train --config configs/mnist.yaml          # 2 CPU processes, gloo DDP

The step and the loop are fastvae.trainer.Trainer; this module is the command line.
"""

from __future__ import annotations

import argparse
import os
import signal

from fastvae.config import Config, keys_help, load_config
from fastvae.errors import exit_on_user_error


def train(cfg: Config, stop_signals=None, datasets: tuple | None = None) -> dict:
    """Train (or resume) the run `cfg` describes; any of `stop_signals` (default SIGTERM, SIGINT)
    checkpoints and stops it early. `datasets`: (train, test) instead of the ones cfg.data names."""
    from fastvae.trainer import Trainer

    return Trainer(cfg, stop_signals, datasets).fit()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fastvae.train", description="Train a VAE.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys (override any with key=value; values are YAML):\n"
                                            + keys_help())
    parser.add_argument("--config", help="a shipped config (mnist, fashion_mnist, celeba, imagefolder) or a YAML path; "
                                         "defaults if omitted")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.epochs=5 data.batch_size=64")
    return parser.parse_intermixed_args(argv)  # key=value overrides before and after --config


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    result = train(load_config(args.config, args.overrides))
    code = 128 + signal.Signals[result["stopped_by"]].value if result["stopped_by"] else 0
    if code or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from fastvae.distributed import leave_launched_process  # (torch: not imported for --help)

        leave_launched_process(code)
    return result


if __name__ == "__main__":
    main()
