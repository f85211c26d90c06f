"""Cluster launchers (SLURM via submitit), imported as `fastvae.launch`."""
