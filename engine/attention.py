"""Attention over packed sequences for transformers' decoder models (Qwen2, Llama), registered by name.

`enable_packed_attention(model, attention=)` registers the attention function `flowgrpo_packed`
with transformers' `AttentionInterface` (and `sdpa`'s mask builder under the same name), sets it
on the model, and chooses the packed backend ONCE for the model's device and dtype; the choice is
kept on the model and its attention modules (`model.packed_attention`), so a forward only looks it
up (a model moved to another device afterwards keeps it: enable again with a name to re-choose). The function looks at the forward kwargs:

- with `cu_seq_lens_q` (the packed path, see `engine.model.hidden_states`): a batch of one row of
  T tokens holding several sequences; each token attends causally within its own sequence only.
- without it: exactly transformers' `sdpa` attention with the mask transformers built, so
  generation (KV cache, left padding) on the same model object behaves as under `sdpa`.

Backends (`BACKENDS`, in the order `attention="auto"` tries them):

1. `flash_attn_varlen`: `flash_attn_varlen_func` (CUDA, fp16/bf16, the flash-attn package installed).
2. `varlen_attn`: torch's `torch.nn.attention.varlen.varlen_attn` (Flash Attention inside torch;
   CUDA, fp16/bf16, a torch whose `varlen_attn` takes `window_size` and `scale`, i.e. ≥ 2.11, built
   with Flash Attention). Causal is `window_size=(-1, 0)`; GQA is native to the kernel
   (`enable_gqa=True` is passed where the signature has it).
3. `flex`: FlexAttention with a document + causal `BlockMask` built once per packed forward from the
   host copy of `cu_seqlens` (block-level emptiness and fullness computed from the sequence bounds,
   no [T, T] evaluation), shared by every layer; `enable_gqa` for grouped KV heads. Compiled with
   `torch.compile(dynamic=True)` on CUDA: one kernel for every packed length. On CPU, torch (2.13) has no FlexAttention backward, so it is offered
   only for models without trainable parameters, runs eagerly (the eager path materialises the
   [H, T, T] scores), and `auto` never picks it there. (Compiled on CPU, torch 2.13 builds a correct
   kernel for one length but fails to compile the dynamic-shape kernel: a C++ error in its CPU template.)
4. `sdpa_per_sequence`: SDPA once per sequence per layer (exact anywhere; one launch per sequence
   and layer). The last resort, and the CPU path.

`attention=NAME` forces one; an unavailable one is a one-line `AttentionUnavailable` naming the
reason and the backends available. Rotary embeddings see the per-sequence `position_ids` the caller
passes. Sliding-window layers are not supported on the packed path (Qwen2.5 and Llama/SmolLM2 do
not use them) and raise; attention dropout is supported by `sdpa_per_sequence` only.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "flowgrpo_packed"
BACKENDS = ("flash_attn_varlen", "varlen_attn", "flex", "sdpa_per_sequence")
ATTENTION_CHOICES = ("auto", *BACKENDS)
HALF = (torch.float16, torch.bfloat16)
FLEX_BLOCK = 128  # FlexAttention's default sparse block size


class AttentionUnavailable(ValueError):
    """A packed-attention backend asked for that cannot run here; the message names the available ones."""


@functools.cache
def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen() -> tuple[Callable | None, dict[str, Any], str]:
    """torch's `varlen_attn` and the extra keywords it is called with, or (None, {}, why not)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}, f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.11 has)"
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params or "scale" not in params:
        return None, {}, f"torch {torch.__version__}'s varlen_attn takes no window_size/scale (torch >= 2.11 does)"
    # GQA is native to the Flash kernel; torch >= 2.13 also asks for enable_gqa=True before it allows it.
    return varlen_attn, ({"enable_gqa": True} if "enable_gqa" in params else {}), ""


@functools.cache
def _flex(device_type: str) -> Callable:
    """FlexAttention for tensors on `device_type`: on CUDA compiled once with dynamic shapes (every packed row
    has its own length; one shape-generic kernel instead of a recompilation per length), elsewhere eager."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype, *, trainable: bool = True) -> str:
    """Why backend `name` cannot run for a model on `device` in `dtype` ("" if it can)."""
    dev = torch.device(device)
    if name not in BACKENDS:
        return f"unknown backend (choose from {list(ATTENTION_CHOICES)})"
    if name == "sdpa_per_sequence":
        return ""
    if name == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if dev.type == "cpu" and trainable:
            return (
                f"FlexAttention has no backward on CPU (torch {torch.__version__}); the model has trainable parameters"
            )
        if dev.type not in ("cpu", "cuda"):
            return f"FlexAttention runs on CPU and CUDA here, not {dev.type}"
        return ""
    if dev.type != "cuda":
        return f"needs CUDA, the model is on {dev.type}"
    if dtype not in HALF:
        return f"needs float16/bfloat16, the model is {str(dtype).removeprefix('torch.')}"
    if name == "flash_attn_varlen":
        return "" if _flash_varlen() is not None else "the flash-attn package is not installed"
    fn, _, why = _torch_varlen()
    if fn is None:
        return why
    if not torch.backends.cuda.is_flash_attention_available():
        return f"torch {torch.__version__} was built without Flash Attention"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "torch's Flash Attention needs compute capability 8.0 or newer"
    return ""


def available_backends(device: torch.device | str, dtype: torch.dtype, *, trainable: bool = True) -> list[str]:
    return [b for b in BACKENDS if not unavailable_reason(b, device, dtype, trainable=trainable)]


# --- the backends: query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D] ---------------------------


@dataclass(frozen=True)
class Packed:
    """What every backend gets for one packed row: boundaries on the device and on the host."""

    cu: torch.Tensor  # [S+1] int32 on the tensors' device
    bounds: Sequence[int]  # the same on the host
    max_len: int
    scaling: float | None
    dropout: float
    block_mask: Any = None  # flex: the document mask of this row (built once per forward)


def _sdpa_per_sequence(query, key, value, p: Packed):
    groups = query.shape[1] // key.shape[1]
    outs = []
    for a, b in itertools.pairwise(p.bounds):
        k = key[:, :, a:b]
        v = value[:, :, a:b]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        outs.append(
            F.scaled_dot_product_attention(query[:, :, a:b], k, v, dropout_p=p.dropout, is_causal=True, scale=p.scaling)
        )
    return torch.cat(outs, dim=2).transpose(1, 2)


def _flash_attn_varlen(query, key, value, p: Packed):
    out = _flash_varlen()(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens_q=p.cu,
        cu_seqlens_k=p.cu,
        max_seqlen_q=p.max_len,
        max_seqlen_k=p.max_len,
        dropout_p=p.dropout,
        softmax_scale=p.scaling,
        causal=True,
    )
    return out.unsqueeze(0)


def _varlen_attn(query, key, value, p: Packed):
    fn, gqa, _ = _torch_varlen()
    out = fn(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        p.cu,
        p.cu,
        p.max_len,
        p.max_len,
        scale=p.scaling,
        window_size=(-1, 0),
        **gqa,
    )
    return out.unsqueeze(0)


def document_block_mask(bounds: Sequence[int], device: torch.device | str, block: int = FLEX_BLOCK):
    """FlexAttention `BlockMask` of causal attention within each [a, b) of `bounds` (a packed row of bounds[-1] tokens).

    Which (query block, key block) tiles hold any allowed pair, and which hold only allowed pairs, follows
    from the sequence bounds alone: tile (i, j) has one iff j <= i and the two blocks share a sequence
    (sequences are contiguous, so a shared sequence and j < i give a key before a query); it is full iff
    j < i, both blocks lie inside one and the same sequence, and the query block is not the ragged last one.
    """
    from torch.nn.attention.flex_attention import BlockMask

    total = bounds[-1]
    lengths = torch.tensor([b - a for a, b in itertools.pairwise(bounds)])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    n = -(-total // block)
    starts = torch.arange(n) * block
    ends = torch.clamp(starts + block, max=total) - 1
    first, last = doc[starts], doc[ends]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    single = first == last
    complete = (starts + block <= total)[:, None]
    partial_or_full = (j <= i) & (first[:, None] <= last[None, :])
    full = (j < i) & single[:, None] & single[None, :] & (first[:, None] == first[None, :]) & complete
    partial = partial_or_full & ~full

    def blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Indices of the set tiles first, in increasing order (a stable sort of "not set").
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1).to(torch.int32)[None, None].to(device), idx[None, None].to(device)

    doc_dev = doc.to(device)

    def same_sequence_causal(b, h, q_idx, kv_idx):
        return (doc_dev[q_idx] == doc_dev[kv_idx]) & (q_idx >= kv_idx)

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=block,
        mask_mod=same_sequence_causal,
        seq_lengths=(total, total),
    )


def _flex_attention(query, key, value, p: Packed):
    mask = p.block_mask if p.block_mask is not None else document_block_mask(p.bounds, query.device)
    out = _flex(query.device.type)(
        query, key, value, block_mask=mask, scale=p.scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


_RUN: dict[str, Callable] = {
    "flash_attn_varlen": _flash_attn_varlen,
    "varlen_attn": _varlen_attn,
    "flex": _flex_attention,
    "sdpa_per_sequence": _sdpa_per_sequence,
}


@dataclass(frozen=True)
class PackedAttention:
    """The backend chosen for one model: its name, the device/dtype it was chosen for, how it was asked for."""

    name: str
    device: str
    dtype: torch.dtype
    requested: str = "auto"
    run: Callable = field(repr=False, default=None)

    def prepare(self, bounds: Sequence[int], device: torch.device | str) -> dict[str, Any]:
        """Extra forward kwargs computed once per packed forward and shared by all layers (flex: its BlockMask)."""
        return {"flex_block_mask": document_block_mask(bounds, device)} if self.name == "flex" else {}


def choose_backend(
    device: torch.device | str, dtype: torch.dtype, attention: str = "auto", *, trainable: bool = True
) -> PackedAttention:
    """The packed-attention backend for a model on `device` in `dtype`: `attention` itself, or the first
    available of `BACKENDS` for "auto" (flex is not auto-picked on CPU). One-line error if unavailable."""
    dev = torch.device(device)
    if attention not in ATTENTION_CHOICES:
        raise AttentionUnavailable(f"unknown attention backend {attention!r}; choose from {list(ATTENTION_CHOICES)}")
    if attention == "auto":
        candidates = [b for b in BACKENDS if not (b == "flex" and dev.type == "cpu")]
        name = next(b for b in candidates if not unavailable_reason(b, dev, dtype, trainable=trainable))
    else:
        why = unavailable_reason(attention, dev, dtype, trainable=trainable)
        if why:
            raise AttentionUnavailable(
                f"attention backend {attention!r} is unavailable on {dev} "
                f"{str(dtype).removeprefix('torch.')}: {why}; available here: "
                f"{available_backends(dev, dtype, trainable=trainable)}"
            )
        name = attention
    return PackedAttention(name, str(dev), dtype, attention, _RUN[name])


def packed_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend "auto" picks for a trainable model on `device` in `dtype`."""
    return choose_backend(device, dtype).name


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; packed when `cu_seq_lens_q` is given, else plain sdpa."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    backend: PackedAttention | None = getattr(module, "packed_attention", None)
    if backend is None:
        raise RuntimeError(
            "packed attention was not enabled on this model; call engine.attention.enable_packed_attention"
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects a batch of one packed row, got batch {query.shape[0]}")
    if sliding_window is not None:
        raise NotImplementedError(
            "packed attention does not implement sliding-window layers (use_sliding_window=False)"
        )
    bounds = kwargs.get("cu_seq_lens_host")
    if bounds is None:
        bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seqlens cover [{bounds[0]}, {bounds[-1]}) but the packed row has {query.shape[2]} tokens")
    max_len = int(kwargs.get("max_length_q") or 0) or max(b - a for a, b in itertools.pairwise(bounds))
    p = Packed(cu, bounds, max_len, scaling, dropout, kwargs.get("flex_block_mask"))
    return backend.run(query, key, value, p), None


def register_packed_attention() -> None:
    """Register `flowgrpo_packed` with transformers (idempotent); its mask builder is sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _attention_modules(model) -> list[torch.nn.Module]:
    """The modules transformers passes to the attention function (Qwen2Attention, LlamaAttention)."""
    return [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]


def enable_packed_attention(model, attention: str = "auto") -> PackedAttention:
    """Switch `model` (a transformers PreTrainedModel) to the packed-aware attention and choose its backend
    once, for the device and dtype of its parameters. Called again with "auto" it keeps the choice made;
    with a backend name it re-chooses. Returns the choice (also `model.packed_attention`)."""
    current = getattr(model, "packed_attention", None)
    if (
        getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
        and current is not None
        and attention in ("auto", current.name)
    ):
        return current
    param = next(model.parameters())
    trainable = any(p.requires_grad for p in model.parameters())
    dropout = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)
    choice = choose_backend(param.device, param.dtype, attention, trainable=trainable)
    if dropout > 0 and choice.name != "sdpa_per_sequence":
        if attention != "auto":
            raise AttentionUnavailable(
                f"attention backend {attention!r} has no attention dropout (the model has {dropout}); "
                f"use sdpa_per_sequence"
            )
        choice = choose_backend(param.device, param.dtype, "sdpa_per_sequence", trainable=trainable)
    register_packed_attention()
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules flowgrpo recognises (Qwen2, Llama)")
    for m in (model, *modules):
        m.packed_attention = choice
    return choice


def packed_attention_of(model) -> PackedAttention | None:
    """The backend chosen for `model` (None before `enable_packed_attention`)."""
    return getattr(model, "packed_attention", None)
