"""fastvae: the lecture's VAEs, trained fast with accelerate, fused Triton kernels and SLURM."""

__version__ = "0.1.0"
