"""Attention over packed sequences for transformers' decoder models (Qwen2, Llama), registered by name.

`enable_packed_attention(model)` registers the attention function `flowgrpo_packed` with
transformers' `AttentionInterface` (and `sdpa`'s mask builder under the same name) and sets it on
the model. The function looks at the forward kwargs:

- with `cu_seq_lens_q` (the packed path, see `engine.model.hidden_states`): a batch of one row of
  T tokens holding several sequences; each token attends causally within its own sequence only.
  On CUDA with fp16/bf16 and flash-attn installed this is `flash_attn_varlen_func`; otherwise
  SDPA is run once per sequence (exact on CPU and GPU; one kernel launch per sequence and layer,
  which is the price of not needing flash-attn).
- without it: exactly transformers' `sdpa` attention with the mask transformers built, so
  generation (KV cache, left padding) on the same model object behaves as under `sdpa`.

Rotary embeddings see the per-sequence `position_ids` the caller passes. Sliding-window layers are
not supported on the packed path (Qwen2.5 and Llama/SmolLM2 do not use them) and raise.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "flowgrpo_packed"


@functools.cache
def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def packed_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which kernel the packed path uses for tensors on `device` in `dtype`: "flash_attn_varlen" or "sdpa_per_sequence"."""
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
        return "flash_attn_varlen"
    return "sdpa_per_sequence"


def _sdpa_per_sequence(query, key, value, bounds, scaling, dropout):
    """query [1, H, T, D], key/value [1, Hkv, T, D] → [1, T, H, D], causal within each [a, b) of `bounds`."""
    groups = query.shape[1] // key.shape[1]
    outs = []
    for a, b in itertools.pairwise(bounds):
        k = key[:, :, a:b]
        v = value[:, :, a:b]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        outs.append(
            F.scaled_dot_product_attention(query[:, :, a:b], k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        )
    return torch.cat(outs, dim=2).transpose(1, 2)


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
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects a batch of one packed row, got batch {query.shape[0]}")
    if sliding_window is not None:
        raise NotImplementedError(
            "packed attention does not implement sliding-window layers (use_sliding_window=False)"
        )
    if packed_backend(query.device, query.dtype) == "flash_attn_varlen":
        max_len = int(kwargs.get("max_length_q") or 0)
        if max_len <= 0:
            raise ValueError("packed attention with flash-attn needs max_length_q (the longest packed sequence)")
        out = _flash_varlen()(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            cu_seqlens_q=cu,
            cu_seqlens_k=kwargs.get("cu_seq_lens_k", cu),
            max_seqlen_q=max_len,
            max_seqlen_k=int(kwargs.get("max_length_k") or max_len),
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=True,
        )
        return out.unsqueeze(0), None
    bounds = kwargs.get("cu_seq_lens_host")
    if bounds is None:
        bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seqlens cover [{bounds[0]}, {bounds[-1]}) but the packed row has {query.shape[2]} tokens")
    return _sdpa_per_sequence(query, key, value, bounds, scaling, dropout), None


def register_packed_attention() -> None:
    """Register `flowgrpo_packed` with transformers (idempotent); its mask builder is sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable_packed_attention(model) -> None:
    """Switch `model` (a transformers PreTrainedModel) to the packed-aware attention; no-op if already on."""
    if getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        return
    register_packed_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
