"""The one parity helper every kernel test uses: compare with the float64 eager reference."""

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def max_relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: the error relative to the tensor's scale."""
    ref = reference.detach().double()
    err = (actual.detach().double() - ref).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-30)


def assert_parity(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(reference).all(), f"{what}: finiteness differs"
    error = max_relative_error(actual, reference)
    assert error <= TOLERANCE[dtype], f"{what} ({dtype}): max relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"
    return error
