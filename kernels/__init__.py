"""Fused Triton kernels for the VAE ops, imported as `fastvae.kernels`.

The kernels (fused_reparam_kl, fused_recon_loss) arrive with the kernels issue;
until then this package is empty and `train.ops=triton` says so.
"""
