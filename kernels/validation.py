"""Input checks shared by the loss ops (`token_logprobs`, `flow_grpo_loss`, the LM-head variant).

Two kinds of checks, so that a call costs at most one device→host sync (and, once per process before the
first interpreted launch, `check_interpreter`: a Triton interpreter this environment cannot run):

* eager checks on metadata only (shapes, dtypes, devices, hyperparameters, `impl`), which never
  synchronise and raise before any kernel runs;
* checks on *values* (targets in range, NaN/inf logits, NaN in old/ref log-probs or advantages,
  `cu_seqlens` contents, 0/1 loss mask). These are derived from O(N) outputs the kernels produce
  anyway (a NaN or +inf logit makes its row's log-sum-exp non-finite; a target outside [0, V) is
  read as NaN by the kernels instead of out of bounds), reduced to counts on the device, fetched
  with the op's single sync, and only on failure diagnosed (`raise_for_bad_rows`) with the rows
  named. No extra pass over the [N, V] logits.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
import triton
import triton.language as tl

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "torch")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_logits(logits: torch.Tensor, name: str = "logits") -> tuple[int, int]:
    """`logits` is a [N, V] float32/bfloat16/float16 tensor with N, V >= 1; returns (N, V)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [N, V] (tokens × vocabulary), got shape {tuple(logits.shape)}; "
            f"flatten batch dimensions first, e.g. {name}.reshape(-1, {name}.shape[-1])"
        )
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"{name} dtype must be one of {[_dtype_name(d) for d in LOGIT_DTYPES]}, got {_dtype_name(logits.dtype)}"
            + ("; for float64 use kernels.reference" if logits.dtype == torch.float64 else "")
        )
    n, v = logits.shape
    if n == 0:
        raise ValueError(f"{name} is empty (N = 0 tokens): pass at least one token")
    if v == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    return n, v


def check_targets(targets: torch.Tensor, n: int, device: torch.device) -> None:
    """`targets` is an integer [N] tensor on `device` (values are checked from the kernel outputs)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must be an integer tensor (int32 or int64 token ids), got {_dtype_name(targets.dtype)}"
        )
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must have shape [N] = ({n},) to match logits, got {tuple(targets.shape)}")
    _check_device("targets", targets, device)


def check_per_token(x: torch.Tensor | None, n: int, device: torch.device, name: str) -> None:
    """A per-token float input (`old_logprobs`, `advantages`, `ref_logprobs`) of shape [N]."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(x.dtype)}")
    if tuple(x.shape) != (n,):
        raise ValueError(f"{name} must have shape [N] = ({n},) to match logits, got {tuple(x.shape)}")
    _check_device(name, x, device)


def check_loss_mask(loss_mask: torch.Tensor, n: int, device: torch.device) -> None:
    """`loss_mask` is a [N] bool / integer / float tensor of 0s and 1s (values checked with the sync)."""
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a torch.Tensor, got {type(loss_mask).__name__}")
    if loss_mask.dtype.is_complex:
        raise TypeError(f"loss_mask must be bool, integer or float, got {_dtype_name(loss_mask.dtype)}")
    if tuple(loss_mask.shape) != (n,):
        raise ValueError(f"loss_mask must have shape [N] = ({n},) to match logits, got {tuple(loss_mask.shape)}")
    _check_device("loss_mask", loss_mask, device)


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, device: torch.device) -> None:
    """`cu_seqlens` is an int32 (or int64) [S+1] tensor; its contents are checked by `cu_seqlens_invalid`."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {_dtype_name(cu_seqlens.dtype)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [S+1] with S >= 1 sequences (0, ..., N), got shape {tuple(cu_seqlens.shape)}"
        )
    _check_device("cu_seqlens", cu_seqlens, device)


def cu_seqlens_invalid(cu_seqlens: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """0-d bool tensor, true unless cu_seqlens starts at 0, ends at N and never decreases (no sync)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.long()
    return (cu[0] != 0) | (cu[-1] != n) | (cu[1:] < cu[:-1]).any()


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits are on {device}: move it with {name}.to(logits.device)")


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (Triton then runs it on the CPU)."""
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def _loop_bound_probe(x_ptr, n):
    bound = (x_ptr.to(tl.int64, bitcast=True) % 16) // 16 + n  # computed in the kernel, as the row loops' are
    total = 0
    for i in range(0, bound):
        total += i
    tl.store(x_ptr, total)


@functools.cache
def check_interpreter() -> None:
    """Raise (one line) when this Triton's interpreter cannot run a loop whose bound is computed in the kernel,
    as the row loops of these kernels are: Triton 3.6's interpreter turns the bound into a Python int with
    int(array), which NumPy ≥ 2.4 refuses for a one-element array (Triton 3.9's squeezes it first)."""
    x = torch.zeros(1, dtype=torch.int64)
    try:
        _loop_bound_probe[(1,)](x, 3)
    except Exception as e:  # the interpreter wraps the TypeError in its own error type
        numpy_version = getattr(sys.modules.get("numpy"), "__version__", "?")  # loaded by the interpreter
        raise RuntimeError(
            f"the Triton {triton.__version__} interpreter cannot run these kernels with NumPy {numpy_version} "
            f"({e}); install numpy<2.4 or a Triton whose interpreter supports NumPy 2.4 (3.9 does)"
        ) from e
    if x.item() != 3:
        raise RuntimeError(f"the Triton {triton.__version__} interpreter ran a 3-step loop to {x.item()}, not 3")


def resolve_impl(impl: str, device: torch.device, kernel: object) -> str:
    """`auto` → `triton` for CUDA tensors, `torch` otherwise; `triton` on CPU needs the interpreter."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"impl='triton' got tensors on {device}, and Triton kernels run only on CUDA tensors or, on the CPU, "
            "under the Triton interpreter: move the tensors to a CUDA device, or set TRITON_INTERPRET=1 in the "
            "environment before `kernels` is imported, or use impl='torch' (or 'auto')"
        )
    if impl == "triton" and device.type != "cuda":
        check_interpreter()
    return impl


def raise_for_bad_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logp: torch.Tensor,
    name: str = "logits",
    *,
    row_ids: torch.Tensor | None = None,
) -> None:
    """Called when some row's log-prob is non-finite: raise a ValueError that names rows and cause.

    Runs only on the error path, so it may look at the offending rows of `logits` in full. With
    `row_ids`, `logits`, `targets` and `logp` hold only those rows of the batch, named by these ids.
    """
    bad = (~torch.isfinite(logp)).nonzero().flatten()
    if bad.numel() == 0:
        return
    ids = bad if row_ids is None else row_ids[bad]
    v = logits.shape[1]
    t = targets[bad].long()
    out_of_range = (t < 0) | (t >= v)
    if out_of_range.any():
        rows = ids[out_of_range][:8].tolist()
        vals = t[out_of_range][:8].tolist()
        raise ValueError(
            f"targets out of range [0, V) = [0, {v}) at rows {rows} (values {vals}); targets must be valid token ids "
            "for every row (exclude positions from a loss with loss_mask, keeping any valid id there)"
        )
    rows_z = logits[bad].float()
    has_nan = torch.isnan(rows_z).any(dim=1)
    has_pinf = (rows_z == float("inf")).any(dim=1)
    if (has_nan | has_pinf).any():
        sel = has_nan | has_pinf
        rows = ids[sel][:8].tolist()
        kinds = ["NaN" if a else "+inf" for a in has_nan[sel][:8].tolist()]
        raise ValueError(
            f"{name} contain non-finite values (NaN or +inf) in {int(sel.sum())} row(s), e.g. rows {rows} ({kinds}); "
            "check the model's forward pass (overflow in half precision, a diverged update)"
        )
    target_logit = rows_z.gather(1, t.unsqueeze(1)).squeeze(1)
    rows = ids[:8].tolist()
    if not torch.isfinite(target_logit).all():
        raise ValueError(
            f"the target's logit is -inf at rows {rows}: -inf logits (masked vocabulary entries) are allowed only "
            "where they are not the target, whose log-prob would be -inf"
        )
    raise ValueError(f"non-finite log-probs at rows {rows} (the {name} of these rows are all -inf?)")


# Rows of logits the linear ops materialise to name the cause of non-finite log-probs (error path only).
DIAGNOSED_ROWS = 64


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """hidden [N, d], the LM head's weight [V, d] and bias [V] (or None): one float dtype, one device.

    Returns (N, d, V). The logits `hidden @ weight.T + bias` are never formed, so these are the
    checks `check_logits` makes on them, plus the agreement of the three.
    """
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be 2-D [N, d] (tokens × hidden size), got shape {tuple(hidden.shape)}; "
            "flatten batch dimensions first, e.g. hidden.reshape(-1, hidden.shape[-1])"
        )
    n, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(
            f"weight (the LM head) must be 2-D [V, d] with d = {d} as in hidden [N, d] = {list(hidden.shape)}, "
            f"got shape {tuple(weight.shape)}; pass the head's weight as stored by nn.Linear(d, V) (not transposed)"
        )
    v = weight.shape[0]
    if hidden.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"hidden dtype must be one of {[_dtype_name(t) for t in LOGIT_DTYPES]}, got {_dtype_name(hidden.dtype)}"
            + ("; for float64 use kernels.reference" if hidden.dtype == torch.float64 else "")
        )
    for name, x in (("weight", weight), ("bias", bias)):
        if x is None:
            continue
        if x.dtype != hidden.dtype:
            raise TypeError(
                f"{name} is {_dtype_name(x.dtype)} but hidden is {_dtype_name(hidden.dtype)}: the product is taken in "
                f"one dtype (float32 accumulation); cast first, e.g. {name}.to(hidden.dtype)"
            )
        if x.device != hidden.device:
            raise ValueError(
                f"{name} is on {x.device} but hidden is on {hidden.device}: move it with .to(hidden.device)"
            )
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape [V] = ({v},) to match weight [V, d], got {tuple(bias.shape)}")
    if n == 0:
        raise ValueError("hidden is empty (N = 0 tokens): pass at least one token")
    if d == 0:
        raise ValueError("hidden has an empty feature dimension (d = 0)")
    if v == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    return n, d, v


def raise_for_bad_linear_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logp: torch.Tensor,
) -> None:
    """`raise_for_bad_rows` for the linear ops, which never hold the logits `hidden @ weight.T + bias`.

    Names a non-finite input of the product first (hidden rows, LM-head rows, NaN/+inf bias entries;
    a -inf bias masks a vocabulary entry and is allowed), then materialises in float32 the logits of
    at most `DIAGNOSED_ROWS` bad rows (in vocabulary chunks) for the causes `raise_for_bad_rows` names.
    """
    bad = (~torch.isfinite(logp)).nonzero().flatten()
    if bad.numel() == 0:
        return
    rows_h = bad[~torch.isfinite(hidden[bad]).all(dim=1)]
    if rows_h.numel():
        raise ValueError(
            f"hidden contains non-finite values (NaN or inf) in {rows_h.numel()} row(s), e.g. rows "
            f"{rows_h[:8].tolist()}; check the model's forward pass (overflow in half precision, a diverged update)"
        )
    rows_w = (~torch.isfinite(weight).all(dim=1)).nonzero().flatten()
    if rows_w.numel():
        raise ValueError(
            f"weight (the LM head) contains non-finite values (NaN or inf) in {rows_w.numel()} vocabulary row(s), "
            f"e.g. rows {rows_w[:8].tolist()}; the parameters have diverged (check the learning rate and clipping)"
        )
    if bias is not None:
        cols_b = (torch.isnan(bias) | (bias == float("inf"))).nonzero().flatten()
        if cols_b.numel():
            raise ValueError(
                f"bias contains NaN or +inf at {cols_b.numel()} vocabulary entries, e.g. {cols_b[:8].tolist()} "
                "(-inf is allowed: it masks an entry)"
            )
    sub = bad[:DIAGNOSED_ROWS]
    h = hidden[sub].float()
    chunk = max(1, (64 << 20) // (4 * hidden.shape[1]))  # float32 copies of weight rows, 64 MiB at a time
    logits = torch.cat(
        [
            torch.nn.functional.linear(
                h, weight[j : j + chunk].float(), None if bias is None else bias[j : j + chunk].float()
            )
            for j in range(0, weight.shape[0], chunk)
        ],
        dim=1,
    )
    raise_for_bad_rows(logits, targets[sub], logp[sub], "logits (hidden @ weight.T + bias)", row_ids=sub)
