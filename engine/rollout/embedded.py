"""The embedded rollout engine: batched sampling on the trainer's own transformers model object.

Algorithm of one `generate` call (all prompts in one batch, optionally split by `max_batch_size`):

1. Left-pad the prompts to the longest one; `attention_mask` marks real tokens and
   `position_ids = cumsum(mask) - 1`, so every sequence sees positions 0..len-1 as it would alone.
2. Prefill once with a fresh `DynamicCache`, keeping the logits of the last position only.
3. Decode one token per step for every live sequence: logits → float32 → processed distribution
   → sample with a `torch.Generator` seeded from `SamplingConfig.seed` → record the log-prob of the
   sampled token under that processed distribution. A sequence ends on a stop token (kept in its
   `token_ids`) or at its token limit; finished sequences are dropped from the batch and the cache
   (`batch_select_indices`), so the decode batch shrinks as sequences finish.

The processed distribution is `log_softmax(logits / T)`, restricted to `allowed_token_ids`
(constrained decoding: every other id gets probability 0), then to the top-k logits and then to
the smallest top-p nucleus (renormalised) when those are set, in the order vLLM's sampler and
`engine.rollout.sampling.processed_logprobs` apply them; with no restriction it is exactly
`log_softmax(logits / T)`, the quantity the trainer recomputes. Greedy (`T=0`) takes the
argmax and reports `log_softmax(logits)` of it (temperature 1), since `logits / 0` has no meaning.

Simplifications: one generator serves the whole batch, so a sample depends on the seed and on the
batch composition (not per request as in vLLM); no paged KV cache: the cache lives only inside one
call, so nothing persists between calls and `sleep` has only the allocator's cache to release;
weights are the trainer's parameters, shared by storage, so `sync_weights` is a check that moves
zero bytes when the trainer hands over its own tensors. `stats()["held_bytes"]` is 0: outside a
`generate` call the engine holds nothing of its own (the weights are counted by the trainer,
`shared_weight_bytes` says how many they are).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.preflight import check_model_dir
from engine.rollout.protocol import Generation, SamplingConfig, SleepReport, SyncReport, check_prompts
from engine.rollout.sampling import processed_logprobs

WAKE_TAGS = ("weights", "kv_cache")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EmbeddedEngine:
    """`RolloutEngine` over a transformers causal LM object shared with the trainer (no weight copy).

    `max_batch_size` splits a `generate` call into sequential batches of at most that many prompts
    (None: all prompts in one batch). The model stays where it is (device, dtype); `generate` runs it
    under `torch.inference_mode()` in eval mode and restores its training mode afterwards.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int | None = None) -> None:
        if not hasattr(model, "config") or not callable(model):
            raise TypeError(
                f"model must be a transformers causal LM (nn.Module with .config), got {type(model).__name__}"
            )
        if not hasattr(tokenizer, "apply_chat_template"):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self._model = model
        self._tokenizer = tokenizer
        self._max_batch_size = max_batch_size
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self._lock = threading.Lock()
        self._stats: dict[str, float] = {
            "generate_calls": 0,
            "prompts": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "forward_passes": 0,
            "generate_seconds": 0.0,
            "syncs": 0,
            "sync_bytes_moved": 0,
            "sleeps": 0,
        }

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        max_batch_size: int | None = None,
    ) -> EmbeddedEngine:
        """Load an HF model directory (config.json + safetensors + tokenizer) onto `device`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_model_dir(model_dir)
        if isinstance(dtype, str) and dtype != "auto":
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        model.eval()
        return cls(model, tokenizer, max_batch_size=max_batch_size)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model(self) -> Any:
        return self._model

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        ids = check_prompts(
            prompts, sampling, self._vocab, self._max_positions, "the model's position limit (max_position_embeddings)"
        )
        device = self._model.get_output_embeddings().weight.device
        gen = torch.Generator(device=device)
        if sampling.seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(sampling.seed))
        step = self._max_batch_size or len(ids)
        t0 = time.perf_counter()
        with self._lock:
            was_training = self._model.training
            self._model.eval()
            try:
                with torch.inference_mode():
                    results = []
                    for s in range(0, len(ids), step):
                        results += self._generate_batch(ids[s : s + step], sampling, gen, device)
            finally:
                self._model.train(was_training)
            self._stats["generate_calls"] += 1
            self._stats["prompts"] += len(ids)
            self._stats["prompt_tokens"] += sum(map(len, ids))
            self._stats["generated_tokens"] += sum(len(g.token_ids) for g in results)
            self._stats["generate_seconds"] += time.perf_counter() - t0
        return results

    def _forward(self, **kw: Any) -> torch.Tensor:
        self._stats["forward_passes"] += 1
        out = self._model(**kw, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the model produced NaN/Inf logits during generation; check the weights and dtype")
        return logits

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingConfig, gen: torch.Generator, device: torch.device
    ) -> list[Generation]:
        from transformers import DynamicCache

        bsz, width = len(prompts), max(map(len, prompts))
        input_ids = torch.full((bsz, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        limits = [
            sampling.max_new_tokens
            if self._max_positions is None
            else min(sampling.max_new_tokens, self._max_positions - len(p))
            for p in prompts
        ]
        stop = set(sampling.stop_token_ids)
        cache = DynamicCache(config=self._model.config)
        logits = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in prompts]
        logps: list[list[float]] = [[] for _ in prompts]
        finish = ["length"] * bsz
        live = list(range(bsz))  # original index of each row of the current decode batch
        while True:
            logp = processed_logprobs(logits, sampling)  # [b, V]
            if sampling.temperature == 0:
                tok = logp.argmax(dim=-1)
            else:
                tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
            tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            keep = []
            for row, (i, t, lp) in enumerate(zip(live, tok.tolist(), tok_lp.tolist())):
                tokens[i].append(t)
                logps[i].append(lp)
                if t in stop:
                    finish[i] = "stop"
                elif len(tokens[i]) < limits[i]:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(live):
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                live = [live[r] for r in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            logits = self._forward(
                input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], past_key_values=cache
            )
            next_pos = next_pos + 1
        del cache
        return [
            Generation(
                prompt_ids=p,
                token_ids=tokens[i],
                logprobs=logps[i],
                text=self._tokenizer.decode(tokens[i], skip_special_tokens=True),
                finish_reason=finish[i],
            )
            for i, p in enumerate(prompts)
        ]

    def sleep(self, level: int = 1) -> SleepReport:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (KV cache) or 2 (KV cache and weights), got {level}")
        t0 = time.perf_counter()
        self._stats["sleeps"] += 1
        weights_note = (
            " Level 2 keeps the weights: they are the trainer's own parameters, shared by storage."
            if level == 2
            else ""
        )
        device = self._model.get_output_embeddings().weight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_reserved(device)
            torch.cuda.empty_cache()
            freed = before - torch.cuda.memory_reserved(device)
            note = (
                "The KV cache lives only inside generate; sleep returned the caching allocator's free blocks "
                f"({freed} bytes) to the driver." + weights_note
            )
        else:
            freed = 0
            note = (
                f"On {device.type} torch has no caching allocator: each generate call's KV cache is freed when the "
                "call returns, so sleep has nothing left to release (0 bytes)." + weights_note
            )
        return SleepReport(
            supported=True, level=level, freed_bytes=int(freed), seconds=time.perf_counter() - t0, note=note
        )

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Nothing to re-acquire: weights are the trainer's, the KV cache is built per call."""
        if tags is not None:
            bad = [t for t in tags if t not in WAKE_TAGS]
            if bad:
                raise ValueError(f"unknown wake tags {bad}; use a subset of {list(WAKE_TAGS)} or None")

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        """Prove the trainer's tensors are the engine's parameters (same storage) or copy them in place.

        A tensor whose data pointer, shape, strides, dtype and device equal those of the parameter
        of that name is that parameter: nothing moves. Any other tensor is copied into the
        parameter with `param.data.copy_` and its bytes are counted. Tied names (e.g. `lm_head.weight`
        and `model.embed_tokens.weight`) resolve to one parameter, counted once.
        """
        t0 = time.perf_counter()
        params = dict(self._model.named_parameters(remove_duplicate=False))
        num_expected = len({id(p) for p in params.values()})
        seen: set[int] = set()
        moved = shared = copied = 0
        copied_names: list[str] = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(
                        f"sync_weights got {name!r}, which is not a parameter of the engine's model "
                        f"(expected HF names such as {next(iter(params))!r})"
                    )
                param = params[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"sync_weights: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                    )
                if id(param) in seen:
                    continue
                seen.add(id(param))
                same = (
                    tensor.data_ptr() == param.data_ptr()
                    and tensor.stride() == param.stride()
                    and tensor.dtype == param.dtype
                    and tensor.device == param.device
                )
                if same:
                    shared += 1
                else:
                    param.data.copy_(tensor)
                    moved += param.numel() * param.element_size()
                    copied += 1
                    copied_names.append(name)
        self._stats["syncs"] += 1
        self._stats["sync_bytes_moved"] += moved
        return SyncReport(
            num_tensors=len(seen),
            num_expected=num_expected,
            bytes_moved=moved,
            seconds=time.perf_counter() - t0,
            zero_copy=len(seen) > 0 and moved == 0,
            extra={"shared": shared, "copied": copied, "copied_names": copied_names},
        )

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._stats)
        out["held_bytes"] = 0
        out["shared_weight_bytes"] = sum(p.numel() * p.element_size() for p in self._model.parameters())
        return out
