"""Float comparisons relative to a tensor's scale.

fp32 results re-associate differently on CPUs of the same machine kind (their BLAS kernels differ), so an
element near zero can differ by more than any elementwise `atol` that still means something, while the
difference stays tiny next to the tensor's largest element. Compare against that scale instead."""

from __future__ import annotations

import torch


def scaled_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zeros, inf when only `expected` is)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / scale


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = "") -> None:
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    error = scaled_difference(actual, expected)
    assert error <= rel, f"{name}: max |diff| is {error:.2e} of max |expected| (allowed {rel:.0e})"
