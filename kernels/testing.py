"""The one tolerance table for comparing kernels and references against a float64 gold.

Used by the test suite and by the correctness gate of every benchmark, so a benchmark never
reports a speed for a result the tests would reject. Entries are (atol, rtol) for values of
order one (log-probs, losses, gradients scaled by the aggregation); a caller comparing values of
another scale passes `scale`, and a looser comparison names its reason where it is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    # float32 inputs, float32 accumulation over V ≤ 50257: observed |err| ≤ 3e-6 on log-probs.
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5),
    # bf16 logits are read exactly and accumulated in float32, so the error against a gold built from
    # the same bf16 values is float32 rounding; bf16 *outputs* (gradients) carry 2^-8 relative rounding.
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1.6e-2),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """(atol, rtol) for results computed from inputs of `dtype`."""
    try:
        return _TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for {dtype}; add one to kernels/testing.py") from None


def assert_close(
    actual: torch.Tensor | float,
    expected: torch.Tensor | float,
    *,
    dtype: torch.dtype,
    name: str = "value",
    scale: float = 1.0,
) -> None:
    """Compare `actual` to a (float64) `expected` with the tolerance of the input `dtype`.

    NaN anywhere in `actual` fails, even where `expected` is NaN too: golds here are finite.
    """
    tol = tolerance(dtype)
    a = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    e = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero().flatten()[:8].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad} (a kernel left an output unwritten or overflowed)")
    torch.testing.assert_close(a, e, atol=tol.atol * scale, rtol=tol.rtol, msg=lambda m: f"{name} ({dtype}): {m}")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64; for reports and benchmark gates."""
    return (
        (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
        if actual.numel()
        else 0.0
    )
