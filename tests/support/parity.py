"""The one parity helper every kernel test uses: compare with the float64 eager reference, by the
metric and tolerances the benchmarks use (benchmarks/harness.py)."""

import torch

from benchmarks.harness import PARITY_TOLERANCE as TOLERANCE, max_relative_error

__all__ = ["TOLERANCE", "assert_parity", "max_relative_error"]


def assert_parity(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(reference).all(), f"{what}: finiteness differs"
    error = max_relative_error(actual, reference)
    assert error <= TOLERANCE[dtype], f"{what} ({dtype}): max relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"
    return error
