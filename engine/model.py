"""The planner model: loading from a local HF directory, architecture presets, and the packed forward.

- Supported architectures (`engine.preflight.SUPPORTED_ARCHITECTURES`): Qwen2 and Llama (SmolLM2), tied or
  untied LM head; `load_planner` calls `engine.preflight.check_model_dir`, which rejects any other
  `model_type` (and a missing or damaged directory) with a one-line `UsageError` before anything is loaded
  (the packed attention, fused loss and weight sync are tested on these two).
- `load_planner(path, dtype=, device=)` loads a causal LM from a local Hugging Face directory
  (config.json + *.safetensors) in `dtype` on the host, then moves it to `device` (no `accelerate`
  needed; the host copy is already in `dtype`), with the packed-aware attention of
  `engine.attention` switched on (it behaves as `sdpa` for ordinary, non-packed calls; `attention=`
  forces its packed backend, default "auto").
- `MODEL_SHAPES` is the table of known architectures (Qwen2.5 1.5B and 7B); `preset_config(name)` builds one;
  `build_random_model(config, dtype=, device=)` creates one with random weights directly on the
  target device in the target dtype: the module tree is built on the meta device, cast, then
  materialised with `to_empty` and initialised in place, so 7B never exists in float32 on the host.
- `hidden_states(model, mb)` runs the decoder body (`model.base_model`, i.e. `model.model`, final
  norm included) on a packed `MicroBatch` and returns [T, d]; the LM head is not applied
  (`lm_head_weight` gives it to the fused linear loss, which only ever sees the response rows).
- `forward_flops` / `flops_per_token` count model FLOPs for MFU (matmuls only, causal attention
  counted once, LM head only where it is applied).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.attention import enable_packed_attention
from engine.memory_model import attention_dims
from engine.packing import MicroBatch
from engine.preflight import check_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from None


def load_planner(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention: str = "auto",
):
    """Load the planner from a local HF directory onto `device` in `dtype`, packed attention enabled
    (`attention`: the backend, see `engine.attention`)."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=resolve_dtype(dtype), attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise type(e)(f"could not load the model in {p}: {e}") from e
    model = model.to(device)
    enable_packed_attention(model, attention)
    return model


_QWEN2_5 = dict(
    model_type="qwen2",
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)

# The model-shape table (gpt-fast's `transformer_configs`): name -> the HF config of that architecture.
MODEL_SHAPES: dict[str, dict] = {
    # Qwen2.5-1.5B: d=1536, 28 layers, 12 query / 2 KV heads, FFN 8960, vocab 151936, tied embeddings
    "qwen2.5-1.5b": dict(
        _QWEN2_5,
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-7B: d=3584, 28 layers, 28 query / 4 KV heads, FFN 18944, vocab 152064, untied LM head
    "qwen2.5-7b": dict(
        _QWEN2_5,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    # a 2-layer GQA model for tests: 4 query / 2 KV heads, head_dim 16, an odd vocabulary
    "qwen2-test": dict(
        model_type="qwen2",
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}


def preset_config(name: str, **overrides):
    """The HF config of `MODEL_SHAPES[name]`, with `overrides` (e.g. fewer layers for a test)."""
    from transformers import AutoConfig

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown architecture preset {name!r}; known: {sorted(MODEL_SHAPES)}")
    fields = {**MODEL_SHAPES[name], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@torch.no_grad()
def _init_in_place(model, seed: int) -> None:
    """Normal(0, initializer_range) for linear and embedding weights, zero biases, unit norms, fresh rotary tables."""
    from torch import nn

    std = getattr(model.config, "initializer_range", 0.02)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=gen)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif "RMSNorm" in type(module).__name__:
            module.weight.fill_(1.0)
        elif "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            # to_empty left the non-persistent inverse-frequency buffers uninitialised; rebuild them in float32.
            fresh = type(module)(module.config).to(device)
            module.inv_freq = fresh.inv_freq
            module.original_inv_freq = fresh.original_inv_freq


def build_random_model(
    config,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    attention: str = "auto",
):
    """A causal LM of `config` with random weights, allocated once, on `device`, in `dtype`.

    device="meta" gives the module tree without storage (for counting parameters of big presets).
    """
    from transformers import AutoModelForCausalLM

    dt = resolve_dtype(dtype)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dt)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
        _init_in_place(model, seed)
        model.tie_weights()
    enable_packed_attention(model, attention)
    return model


def lm_head_weight(model) -> torch.Tensor:
    """The LM-head weight [V, d] (the embedding matrix itself when embeddings are tied)."""
    return model.get_output_embeddings().weight


def lm_head_bias(model) -> torch.Tensor | None:
    return getattr(model.get_output_embeddings(), "bias", None)


def packed_forward(model, mb: MicroBatch, head: Callable):
    """`head(h, w, b)` on the response rows `h` [R, d] of the packed micro-batch and the LM head's
    weight `w` [V, d] and bias `b` (or None): only response rows reach the vocabulary projection.

    Bound to the model as `model.packed_forward` (`attach_packed_forward`) so that FSDP can wrap it
    as a forward method; `head` must return a tensor or a tuple of them (FSDP hooks the backward
    through the tensors it finds in the output)."""
    h = hidden_states(model, mb).index_select(0, mb.loss_positions)
    return head(h, lm_head_weight(model), lm_head_bias(model))


def attach_packed_forward(model) -> None:
    """Give `model` the method `packed_forward(mb, head)` (idempotent)."""
    if "packed_forward" not in vars(model):
        model.packed_forward = types.MethodType(packed_forward, model)


def hidden_states(model, mb: MicroBatch) -> torch.Tensor:
    """Last hidden states [T, d] (after the final norm) of the packed micro-batch; attention stays within sequences."""
    backend = enable_packed_attention(model)
    out = model.base_model(
        input_ids=mb.input_ids.unsqueeze(0),
        position_ids=mb.position_ids.unsqueeze(0),
        # An empty 4-D mask: transformers' mask builders (Qwen2's per-layer-type mapping and Llama's
        # create_causal_mask alike) return a 4-D mask as prepared, so no [T, T] mask is built; the
        # attention function ignores it and bounds each sequence with cu_seqlens instead.
        attention_mask=torch.ones((1, 1, 0, 0), dtype=torch.bool, device=mb.input_ids.device),
        use_cache=False,
        cu_seq_lens_q=mb.cu_seqlens,
        cu_seq_lens_k=mb.cu_seqlens,
        max_length_q=mb.max_seqlen,
        max_length_k=mb.max_seqlen,
        cu_seq_lens_host=mb.cu_seqlens_host,
        **backend.prepare(mb.cu_seqlens_host, mb.input_ids.device),
    )
    return out.last_hidden_state[0]


def _dims(config) -> tuple[int, int, int, int, int, int, int]:
    layers, heads, kv_heads, head_dim = attention_dims(config)
    return config.hidden_size, layers, heads, kv_heads, head_dim, config.intermediate_size, config.vocab_size


def body_params(config) -> int:
    """Parameters of the decoder layers that act as matmuls per token (embedding and LM head excluded)."""
    d, layers, heads, kv, hd, ffn, _ = _dims(config)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    mlp = 3 * d * ffn
    return layers * (attn + mlp)


def flops_per_token(config) -> float:
    """Training FLOPs per token of the decoder body (6 · matmul parameters); attention and LM head excluded."""
    return 6.0 * body_params(config)


def forward_flops(config, seq_lens: Sequence[int], lm_head_tokens: int) -> float:
    """Forward FLOPs of one packed pass: body matmuls, causal attention per sequence, LM head on `lm_head_tokens` rows.

    Training (forward + backward) is 3x this; recomputation inside fused kernels is not counted (model FLOPs).
    """
    d, layers, heads, _, hd, _, vocab = _dims(config)
    tokens = sum(seq_lens)
    # Causal attention: query i sees i+1 keys; QK^T and PV each cost 2·hd FLOPs per (query, key, head).
    attn = sum(4.0 * hd * heads * layers * (n * (n + 1) / 2) for n in seq_lens)
    return 2.0 * body_params(config) * tokens + attn + 2.0 * d * vocab * lm_head_tokens


def num_parameters(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())
