"""The colocated training loop: rollout on the engine, Flow-GRPO update, weight sync, every phase measured.

Building a run (`TrainLoop.__init__`): the planner (a local HF directory; the tiny model built into
`run_dir/model` when absent; or a Qwen2.5 architecture with random weights made on the device), the
rollout engine (vLLM when importable and the model is a directory, else the embedded engine, which
samples from the trainer's own model object), the trainer (its frozen reference, when kl_coef > 0,
is a copy of the *base* weights, taken before any checkpoint is loaded), a `MemoryManager` owning the
rollout ↔ train order, and the loss implementation ("fused" needs `kernels.linear_flow_grpo_loss`;
without it the run falls back to "reference" and says so in its header and in every metrics line).
A `tool_token` planner's action set (tool tokens + end-of-turn) becomes the trainer's
`allowed_token_ids`, so both sides use one restricted softmax.

One step. The phase names are the metric keys `timing_s/<name>`, verl's where verl has the phase:

    gen              B queries × G trajectories through the four-agent loop (`agentflow.rollout`)
    reward           the judge's time inside the rollout (taken out of `gen`)
    adv              group-normalised rewards, broadcast to every planner turn (`engine.advantage`)
    sleep            MemoryManager.to_train: the engine sleeps, trainer state back on the device
    pack, old_log_prob, ref, update_actor      `Trainer.update` (ref only when kl_coef > 0)
    gap_probe        the rollout/trainer gap on `gap_probe_seqs` sequences, before and after the sync
    wake             MemoryManager.to_rollout: trainer state off the device, engine weights awake,
                     sync, KV cache awake, ready for the next step
    update_weights   the weight sync inside `wake` (taken out of `wake`)
    save_checkpoint  every `save_every` steps and at the last step
    step             all of the above

On CUDA the phases are timed with device events, elsewhere with `time.perf_counter`; the reward and
sync times come from the rollout's and the MemoryManager's wall clocks. After every phase a memory
snapshot is taken (torch allocated / peak / reserved on CUDA, NVML device memory, process RSS); on
CUDA the peak counter is reset when a phase starts, so each phase reports its own peak.

The gap, three ways: `training/rollout_logprob_diff_*` (every step, all response tokens: the engine's
sampling log-probs vs the trainer's recomputed old log-probs, same weights, so ~1e-7 in float32 when
the sync works); `sync/gap_stale_*` (the engine's log-probs vs the *updated* policy on the same
tokens: what a rollout would be off by without a sync); `sync/gap_after_*` (fresh samples from the
engine right after the sync vs the trainer). A working sync gives gap_after ≪ gap_stale.

Crash safety: metrics.jsonl lines are written whole and fsynced; checkpoints are atomic directories
(`engine.checkpoint`) written every `save_every` steps; each holds its step's metrics record, so a
kill between the checkpoint and the metrics line loses nothing. `resume` loads the newest complete
checkpoint (weights, optimizer, RNG), drops metrics lines of later steps and continues at the next
step with the same per-step seeds; a SIGKILLed run loses at most the steps since its last checkpoint.

Simplifications: one device; every agent role uses the planner's engine (the executor, verifier and
generator therefore follow the trained weights; AgentFlow keeps them frozen).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from agentflow.agents import Caller, Planner
from agentflow.chat import stop_ids
from agentflow.loop import Engines, RolloutResult, build_tools, rollout
from agentflow.tasks import load_jsonl, load_task
from agentflow.tasks.query import Query
from engine.advantage import group_advantages, train_sequences
from engine.checkpoint import CHECKPOINTS, load_checkpoint, load_latest, save_checkpoint
from engine.logprob_gap import trainer_logprobs
from engine.memory import HostOffloader, MemoryManager, nvml, snapshot
from engine.metrics import (
    ConsoleReporter,
    MetricsWriter,
    PhaseTimer,
    atomic_write_bytes,
    step_trace,
    throughput_metrics,
)
from engine.model import build_random_model, check_model_dir, load_planner, num_parameters, preset_config
from engine.packing import TrainSequence
from engine.presets import RunConfig
from engine.rollout.protocol import SamplingConfig
from engine.trainer import Trainer

GiB = float(1 << 30)
MEMORY_FIELDS = (
    ("allocated_gb", "torch_allocated"),
    ("peak_allocated_gb", "torch_peak_allocated"),
    ("reserved_gb", "torch_reserved"),
    ("nvml_used_gb", "nvml_used"),
    ("rss_gb", "rss"),
)
# Keys in every metrics.jsonl line (null where a figure does not exist on this machine or step,
# e.g. perf/mfu/actor on CPU, timing_s/ref without a reference model, timing_s/save_checkpoint
# on steps without a checkpoint). memory/<phase>/<field> exists for every phase that ran.
STEP_KEYS: tuple[str, ...] = (
    "step",
    *(
        f"timing_s/{p}"
        for p in (
            "step",
            "gen",
            "reward",
            "adv",
            "sleep",
            "pack",
            "old_log_prob",
            "ref",
            "update_actor",
            "gap_probe",
            "wake",
            "update_weights",
            "save_checkpoint",
        )
    ),
    "reward/mean",
    "reward/std",
    "reward/max",
    "reward/min",
    "reward/success_rate",
    "rollout/num_queries",
    "rollout/group_size",
    "rollout/num_trajectories",
    "rollout/num_turns",
    "rollout/turns_mean",
    "rollout/turns_max",
    "rollout/response_length_mean",
    "rollout/response_length_max",
    "rollout/prompt_length_mean",
    "rollout/prompt_length_max",
    "rollout/invalid_action_rate",
    "rollout/stop_reason/verifier",
    "rollout/stop_reason/max_turns",
    "rollout/stop_reason/context_budget",
    "rollout/generated_tokens",
    "rollout/prompt_tokens",
    "rollout/planner_response_tokens",
    "rollout/engine_calls",
    "rollout/time_planner_s",
    "rollout/time_executor_s",
    "rollout/time_tools_s",
    "rollout/time_verifier_s",
    "rollout/time_generator_s",
    "adv/num_trajectories",
    "adv/num_groups",
    "adv/num_zero_var_groups",
    "adv/zero_var_group_frac",
    "adv/num_singleton_groups",
    "adv/reward_mean",
    "adv/reward_std",
    "adv/adv_abs_mean",
    "actor/loss",
    "actor/pg_loss",
    "actor/pg_clipfrac",
    "actor/pg_clipfrac_lower",
    "actor/kl_loss",
    "actor/kl_coef",
    "actor/entropy",
    "actor/ratio_mean",
    "actor/ratio_max",
    "actor/grad_norm",
    "actor/grad_norm_max",
    "actor/skipped_steps",
    "actor/optimizer_steps",
    "actor/lr",
    "actor/num_seqs",
    "actor/num_tokens",
    "actor/num_packed_tokens",
    "actor/num_micro_batches",
    "actor/num_mini_batches",
    "actor/packing_efficiency",
    "actor/zero_adv_seqs",
    "actor/loss_impl",
    "training/rollout_logprob_diff_mean",
    "training/rollout_logprob_diff_max",
    "sync/gap_stale_mean",
    "sync/gap_stale_max",
    "sync/gap_after_mean",
    "sync/gap_after_max",
    "sync/bytes_moved",
    "sync/seconds",
    "sync/num_tensors",
    "sync/complete",
    "sync/zero_copy",
    "sleep/supported",
    "sleep/freed_bytes",
    "perf/rollout_tokens_per_s",
    "perf/train_tokens_per_s",
    "perf/mfu/actor",
    "perf/time_per_step",
    "perf/train_flops",
    "perf/max_memory_allocated_gb",
    "perf/max_memory_reserved_gb",
    "perf/cpu_memory_used_gb",
    "time/elapsed_s",
    "engine",
)

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("step", "step", "{:d}"),
    ("timing_s/step", "step_s", "{:.2f}"),
    ("timing_s/gen", "gen_s", "{:.2f}"),
    ("timing_s/update_actor", "upd_s", "{:.2f}"),
    ("timing_s/update_weights", "sync_s", "{:.3f}"),
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/success_rate", "success", "{:.3f}"),
    ("rollout/turns_mean", "turns", "{:.2f}"),
    ("rollout/response_length_mean", "resp_len", "{:.1f}"),
    ("actor/kl_loss", "kl", "{:.1e}"),
    ("actor/entropy", "entropy", "{:.3f}"),
    ("actor/pg_clipfrac", "clipfrac", "{:.3f}"),
    ("actor/grad_norm", "grad_norm", "{:.3f}"),
    ("training/rollout_logprob_diff_max", "gap_max", "{:.1e}"),
    ("sync/gap_after_max", "gap_synced", "{:.1e}"),
    ("perf/rollout_tokens_per_s", "gen_tok/s", "{:.0f}"),
    ("perf/train_tokens_per_s", "train_tok/s", "{:.0f}"),
    ("perf/mfu/actor", "mfu", "{:.3f}"),
)


def fused_loss_available() -> bool:
    import kernels

    return hasattr(kernels, "linear_flow_grpo_loss") and hasattr(kernels, "linear_token_logprobs")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _check_fits(arch, dtype: str, device: torch.device) -> None:
    """Refuse to build random weights that cannot train on `device`: weights + grads + AdamW's two moments."""
    from engine.model import resolve_dtype

    n = num_parameters(build_random_model(arch, dtype=dtype, device="meta"))
    need = 4 * n * resolve_dtype(dtype).itemsize
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import os

        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise ValueError(
            f"{n / 1e9:.2f}B parameters in {dtype} need about {need / GiB:.1f} GiB for weights, gradients and AdamW "
            f"state, but {device} has {free / GiB:.1f} GiB free; run this preset on a GPU (--device cuda) or "
            f"pass a smaller model"
        )


def _finite(m: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy: non-finite floats become None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double().cpu() - b.double().cpu()).abs()
    return d.mean().item(), d.max().item()


class _PhaseMemory:
    """PhaseTimer hook: resets the CUDA peak when a phase starts, snapshots memory when it ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.snaps: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, event: str) -> None:
        if name == "step":
            return
        if event == "enter":
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.snaps[name] = snapshot(name, self.device)

    def metrics(self, extra: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for phase, snap in self.snaps.items():
            for key, field in MEMORY_FIELDS:
                v = snap.get(field)
                out[f"memory/{phase}/{key}"] = None if v is None else v / GiB
        snaps = [*self.snaps.values(), *(r["memory"] for r in extra if "memory" in r)]

        def peak(field: str) -> float | None:
            vals = [s[field] for s in snaps if s.get(field) is not None]
            return max(vals) / GiB if vals else None

        out["perf/max_memory_allocated_gb"] = peak("torch_peak_allocated")
        out["perf/max_memory_reserved_gb"] = peak("torch_reserved")
        out["perf/cpu_memory_used_gb"] = peak("rss")
        return out


class TrainLoop:
    """One training run of `config` (see the module doc); `run()` executes the remaining steps."""

    def __init__(self, config: RunConfig, *, resume: bool = False, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.t_start = time.perf_counter()
        mc = config.model
        self.device = torch.device(mc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)

        # the planner and its tokenizer (the engine choice is checked first: it may reject the model source)
        self.model_dir = self._model_dir(config)
        self.engine_name, why = self._choose_engine(config)
        self.tokenizer = self._tokenizer(config)
        if self.model_dir is not None:
            self.model = load_planner(self.model_dir, dtype=mc.dtype, device=self.device)
        else:
            arch = preset_config(mc.arch)
            for k, v in mc.arch_overrides.items():
                setattr(arch, k, v)
            _check_fits(arch, mc.dtype, self.device)
            self.model = build_random_model(arch, dtype=mc.dtype, device=self.device, seed=config.seed)
            self.notes.append(f"random {mc.arch} weights built on {self.device} (seed {config.seed})")
        if len(self.tokenizer) > self.model.get_output_embeddings().weight.shape[0]:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's LM head only "
                f"{self.model.get_output_embeddings().weight.shape[0]} rows; they do not belong together"
            )

        # the rollout engine
        self.notes.append(f"engine {self.engine_name}: {why}")
        self.engine = self._build_engine(config)

        # resolve what depends on the built parts: the action set and the loss implementation
        trainer_cfg = config.trainer
        planner = Planner(
            Caller(self.engine, "planner", {}), build_tools(config.agent, self.engine), config.agent.planner_format
        )
        if planner.allowed_token_ids is not None:
            trainer_cfg = dataclasses.replace(trainer_cfg, allowed_token_ids=planner.allowed_token_ids)
            names = {**planner.tool_tokens, **{t: "<end-of-turn>" for t in planner.caller.stop}}
            self.notes.append(
                "planner action set (constrained decoding, trainer uses the same restricted softmax): "
                + ", ".join(f"{names[t]}={t}" for t in planner.allowed_token_ids)
            )
        if trainer_cfg.loss_impl == "fused" and not fused_loss_available():
            trainer_cfg = dataclasses.replace(trainer_cfg, loss_impl="reference")
            self.notes.append(
                "loss reference: fallback, this build of `kernels` has no linear_flow_grpo_loss / "
                "linear_token_logprobs (the fused LM-head loss)"
            )
        else:
            self.notes.append(f"loss {trainer_cfg.loss_impl}")
        self.config = dataclasses.replace(config, trainer=trainer_cfg)
        self.planner_sampling = SamplingConfig(
            max_new_tokens=min(config.agent.planner_max_new_tokens, 8),
            temperature=config.agent.temperature,
            stop_token_ids=stop_ids(self.tokenizer),
            allowed_token_ids=trainer_cfg.allowed_token_ids,
        )

        # the trainer: its reference copy is taken here, from the base weights, before any checkpoint loads
        self.trainer = Trainer(self.model, trainer_cfg)
        offload = config.rollout.offload_optimizer
        if offload is None:
            offload = self.device.type == "cuda"
        offloader = HostOffloader(self.trainer.optimizer, grads="release", device=self.device) if offload else None
        self.memory = MemoryManager(
            engine=self.engine, offloader=offloader, sleep_level=config.rollout.sleep_level, device=self.device
        )

        # resume or start over
        self.start_step = 1
        self.resumed_from = None
        ck = load_latest(self.run_dir, notes=self.notes) if resume else None
        if resume and ck is None:
            self.notes.append(f"--resume: no complete checkpoint in {self.run_dir}, starting at step 1")
        if not resume:
            self._clear_previous_run()
        if ck is not None:
            load_checkpoint(ck, self.model, self.trainer.optimizer)
            self.start_step = ck.step + 1
            self.resumed_from = ck
            self.notes.append(f"resumed from {ck.path} (step {ck.step})")
        self.writer = MetricsWriter(self.run_dir, resume_step=ck.step if ck else None)
        if ck is not None:
            self._recover_metrics_line(ck)
        atomic_write_bytes(self.run_dir / "config.json", (self.config.to_json() + "\n").encode())
        self._queries_cache: list[Query] | None = None

    # ---- building ----

    def _model_dir(self, config: RunConfig) -> Path | None:
        mc = config.model
        if mc.path is not None:
            return check_model_dir(mc.path)
        if mc.arch != "tiny":
            return None
        out = self.run_dir / "model"
        if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
            from engine.tiny import make_tiny

            make_tiny(out, mc.tiny)
            self.notes.append(f"built the tiny model into {out}")
        else:
            built = (
                json.loads((out / "flowgrpo_tiny.json").read_text()) if (out / "flowgrpo_tiny.json").exists() else {}
            )
            want = dataclasses.asdict(mc.tiny)
            if built and any(built.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in want.items()):
                raise ValueError(
                    f"{out} holds a tiny model built with other settings than this preset's ({mc.tiny}); "
                    f"use another --run-dir or delete {out}"
                )
        return out

    def _tokenizer(self, config: RunConfig):
        from transformers import AutoTokenizer

        if self.model_dir is not None:
            return AutoTokenizer.from_pretrained(self.model_dir)
        tok_dir = self.run_dir / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            from engine.tiny import build_tokenizer

            build_tokenizer(config.model.tiny.vocab_size, config.model.tiny.extra_tokens).save_pretrained(tok_dir)
        self.notes.append(f"tokenizer: the tiny tokenizer ({tok_dir}); its ids are a subset of the vocabulary")
        return AutoTokenizer.from_pretrained(tok_dir)

    def _choose_engine(self, config: RunConfig) -> tuple[str, str]:
        want = config.rollout.engine
        if want == "vllm":
            if self.model_dir is None:
                raise ValueError(
                    "--engine vllm needs a model directory (vLLM loads from disk); pass --model DIR, "
                    "or use --engine embedded for random weights built on the device"
                )
            if not vllm_available():
                raise RuntimeError("--engine vllm: vLLM is not installed here; install it or use --engine embedded")
            return "vllm", "requested"
        if want == "embedded":
            return "embedded", "requested"
        if self.model_dir is None:
            return "embedded", "auto: random weights on the device have no directory for vLLM to load"
        if not vllm_available():
            return "embedded", "auto: vLLM is not installed"
        return "vllm", "auto: vLLM is installed"

    def _build_engine(self, config: RunConfig):
        if self.engine_name == "embedded":
            from engine.rollout.embedded import EmbeddedEngine

            return EmbeddedEngine(self.model, self.tokenizer)
        from engine.rollout.vllm_engine import VLLMEngine

        rc = config.rollout
        kw: dict[str, Any] = {}
        if rc.kv_cache_bytes is not None:
            kw["kv_cache_bytes"] = rc.kv_cache_bytes
        if rc.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = rc.gpu_memory_utilization
        return VLLMEngine.from_pretrained(
            self.model_dir,
            dtype=config.model.dtype,
            max_model_len=rc.max_model_len or config.agent.context_budget,
            seed=config.seed,
            **kw,
        )

    def _clear_previous_run(self) -> None:
        old = []
        if (self.run_dir / CHECKPOINTS).exists():
            shutil.rmtree(self.run_dir / CHECKPOINTS)
            old.append(CHECKPOINTS + "/")
        for p in [self.run_dir / "metrics.jsonl", *self.run_dir.glob("trace_step_*.json")]:
            if p.exists():
                p.unlink()
                old.append(p.name)
        if old:
            self.notes.append(
                f"starting over in {self.run_dir}: removed the earlier run's {', '.join(old)} "
                f"(pass --resume to continue a run instead)"
            )

    def _recover_metrics_line(self, ck) -> None:
        """A kill between a checkpoint and its metrics line: the checkpoint holds the record; append it."""
        from engine.metrics import read_metrics

        if any(r.get("step") == ck.step for r in read_metrics(self.writer.path)):
            return
        record = ck.state.get("metrics")
        if record:
            self.writer.write(ck.step, record)
            self.notes.append(f"metrics line of step {ck.step} restored from its checkpoint")

    # ---- the steps ----

    def queries(self, step: int) -> list[Query]:
        """The step's B queries: a built-in task seeded by (run seed, step), or the next B of a JSONL file."""
        tc = self.config.task
        if tc.data is None:
            return load_task(tc.name, tc.queries_per_step, seed=self.config.seed * 100_003 + step)
        if self._queries_cache is None:
            self._queries_cache = load_jsonl(tc.data)
            if not self._queries_cache:
                raise ValueError(f"{tc.data} holds no queries")
        data = self._queries_cache
        start = (step - 1) * tc.queries_per_step
        return [data[(start + i) % len(data)] for i in range(tc.queries_per_step)]

    def header(self) -> list[str]:
        mc, tc = self.config.model, self.config.task
        n_params = num_parameters(self.model)
        last = self.config.steps
        nv = nvml()
        lines = [
            f"flowgrpo train · preset {self.config.preset} · run dir {self.run_dir} · steps {self.start_step}..{last}",
            f"  model   {mc.arch} ({n_params / 1e6:.2f}M params, {mc.dtype}) on {self.device}"
            + (f" from {self.model_dir}" if self.model_dir else ""),
            f"  task    {tc.data or tc.name}: {tc.queries_per_step} queries x G={tc.group_size} per step",
            "  memory  nvml " + ("ok" if nv.reason is None else f"unavailable ({nv.reason})"),
            *(f"  note    {n}" for n in self.notes),
            "  resolved config (also in config.json):",
            *(f"    {line}" for line in self.config.summary_lines()),
        ]
        return lines

    def run(self) -> dict[str, Any] | None:
        """Run steps start_step..config.steps; returns the last step's metrics (None when none ran)."""
        cfg = self.config
        print("\n".join(self.header()), file=self.out, flush=True)
        if self.start_step > cfg.steps:
            print(
                f"nothing to do: the run is already at step {self.start_step - 1} >= --steps {cfg.steps}", file=self.out
            )
            return None
        self.reporter = ConsoleReporter(cfg.steps, COLUMNS, file=self.out)
        last = None
        try:
            # the engine starts from the checkpoint's (or the base) weights: sync them once before step 1
            self.memory.to_rollout(weights=self.model.named_parameters)
            self.memory.history.clear()
            for step in range(self.start_step, cfg.steps + 1):
                with step_trace(self.run_dir, step, cfg.trace_step):
                    last = self.step(step)
        finally:
            self.reporter.close()
            self.writer.close()
        print(
            f"done: {cfg.steps} steps in {time.perf_counter() - self.t_start:.1f}s; metrics in {self.writer.path}",
            file=self.out,
        )
        return last

    def step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        mem = _PhaseMemory(self.device)
        timer = PhaseTimer(
            self.device, hooks=[lambda name, ev: ev == "enter" and self.reporter.progress(step, name), mem]
        )
        m: dict[str, Any] = {}
        with timer.phase("step"):
            queries = self.queries(step)
            stats0 = self.engine.stats()
            with timer.phase("gen"), self.memory.phase("rollout"):
                result = rollout(
                    Engines(planner=self.engine),
                    queries,
                    cfg.task.group_size,
                    cfg.agent,
                    seed=cfg.seed * 1_000_003 + step,
                )
            stats1 = self.engine.stats()
            with timer.phase("adv"):
                seqs, adv_metrics = self._sequences(result, queries)
            with timer.phase("sleep"):
                to_train = self.memory.to_train()
            with self.memory.phase("train"):
                train = self.trainer.update(seqs, timer=timer)
            with timer.phase("gap_probe"):
                m.update(self._stale_gap(seqs))
            with timer.phase("wake"):
                to_rollout = self.memory.to_rollout(weights=self.model.named_parameters)
            with timer.phase("gap_probe"):
                m.update(self._after_sync_gap(seqs, step))
            timings = timer.collect()
            m.update(self._record(step, result, stats0, stats1, adv_metrics, train, timings, to_train, to_rollout))
            m.update(mem.metrics([*to_train, *to_rollout]))
            m.update({"timing_s/step": None, "perf/time_per_step": None, "time/elapsed_s": None})  # known at the end
            if step % cfg.save_every == 0 or step == cfg.steps:
                with timer.phase("save_checkpoint"):
                    state = {"preset": cfg.preset, "engine": self.engine_name, "metrics": _finite(m)}
                    save_checkpoint(
                        self.run_dir, step, self.model, self.trainer.optimizer, state, keep_last=cfg.keep_last
                    )
        rest = timer.collect()
        m.update(rest)
        m["perf/time_per_step"] = rest["timing_s/step"]
        m.update(mem.metrics([*to_train, *to_rollout]))
        m["time/elapsed_s"] = time.perf_counter() - self.t_start
        record = self.writer.write(step, m)
        self.memory.history.clear()
        self.reporter.step_done(step, record)
        return record

    def _sequences(self, result: RolloutResult, queries: list[Query]) -> tuple[list[TrainSequence], dict]:
        g = self.config.task.group_size
        trajs = result.trajectories
        for i, tr in enumerate(trajs):
            if tr.query_id != queries[i // g].id:
                raise RuntimeError(f"trajectory {i} is of query {tr.query_id}, expected {queries[i // g].id}")
        group_ids = [i // g for i in range(len(trajs))]
        adv, stats = group_advantages([tr.reward for tr in trajs], group_ids)
        seqs = train_sequences([tr.turns for tr in trajs], adv, group_ids)
        if not seqs:
            raise RuntimeError(
                "the step produced no planner turns: every trajectory ran out of context before its first turn; "
                f"raise the agent's context_budget (now {self.config.agent.context_budget})"
            )
        out = stats.as_metrics()
        out["adv/zero_var_group_frac"] = stats.num_zero_var_groups / max(1, stats.num_groups)
        return seqs, out

    def _stale_gap(self, seqs: list[TrainSequence]) -> dict[str, float | None]:
        """The engine's log-probs (pre-update weights) vs the updated policy, on the same tokens."""
        k = self.config.gap_probe_seqs
        if k == 0:
            return {"sync/gap_stale_mean": None, "sync/gap_stale_max": None}
        mbs = self.trainer.prepare(seqs[:k]).micro_batches
        new = torch.cat(self.trainer.compute_logprobs(mbs))
        mean, mx = _gap(torch.cat([mb.rollout_logprobs for mb in mbs]), new)
        return {"sync/gap_stale_mean": mean, "sync/gap_stale_max": mx}

    def _after_sync_gap(self, seqs: list[TrainSequence], step: int) -> dict[str, float | None]:
        """Fresh samples from the just-synced engine vs the trainer's log-probs of them."""
        k = self.config.gap_probe_seqs
        if k == 0:
            return {"sync/gap_after_mean": None, "sync/gap_after_max": None}
        sampling = dataclasses.replace(self.planner_sampling, seed=self.config.seed * 7_919 + step)
        gens = self.engine.generate([s.prompt_ids for s in seqs[:k]], sampling)
        lps = trainer_logprobs(self.model, gens, sampling)
        mean, mx = _gap(torch.tensor([x for g in gens for x in g.logprobs]), torch.cat(lps))
        return {"sync/gap_after_mean": mean, "sync/gap_after_max": mx}

    def _record(
        self,
        step: int,
        result: RolloutResult,
        stats0: dict,
        stats1: dict,
        adv: dict,
        train: dict,
        timings: dict[str, float],
        to_train: list[dict],
        to_rollout: list[dict],
    ) -> dict[str, Any]:
        cfg = self.config
        trajs = result.trajectories
        turns = [t for tr in trajs for t in tr.turns]
        rewards = [tr.reward for tr in trajs]
        resp = [len(t.response_ids) for t in turns]
        prompt = [len(t.prompt_ids) for t in turns]
        n = len(trajs)
        mean_r = _mean(rewards)
        m: dict[str, Any] = {
            "reward/mean": mean_r,
            "reward/std": math.sqrt(_mean([(r - mean_r) ** 2 for r in rewards])),
            "reward/max": max(rewards),
            "reward/min": min(rewards),
            "reward/success_rate": sum(r >= 1.0 for r in rewards) / n,
            "rollout/num_queries": len(trajs) // cfg.task.group_size,
            "rollout/group_size": cfg.task.group_size,
            "rollout/num_trajectories": n,
            "rollout/num_turns": len(turns),
            "rollout/turns_mean": len(turns) / n,
            "rollout/turns_max": max(len(tr.turns) for tr in trajs),
            "rollout/response_length_mean": _mean(resp),
            "rollout/response_length_max": max(resp, default=0),
            "rollout/prompt_length_mean": _mean(prompt),
            "rollout/prompt_length_max": max(prompt, default=0),
            "rollout/invalid_action_rate": _mean([float(not t.valid) for t in turns]),
            "rollout/generated_tokens": stats1["generated_tokens"] - stats0["generated_tokens"],
            "rollout/prompt_tokens": stats1["prompt_tokens"] - stats0["prompt_tokens"],
            "rollout/planner_response_tokens": sum(resp),
            "rollout/engine_calls": stats1["generate_calls"] - stats0["generate_calls"],
            "rollout/loop_steps": result.loop_steps,
        }
        for reason in ("verifier", "max_turns", "context_budget"):
            m[f"rollout/stop_reason/{reason}"] = sum(tr.stop_reason == reason for tr in trajs) / n
        for phase in ("planner", "executor", "tools", "verifier", "generator"):
            m[f"rollout/time_{phase}_s"] = result.timings.get(phase, 0.0)
        m.update(adv)
        m.update(train)
        m["actor/loss_impl"] = cfg.trainer.loss_impl
        m["engine"] = self.engine_name

        # timings: the judge's share of gen is `reward`, the sync's share of wake is `update_weights`
        t = dict(timings)
        t["timing_s/reward"] = result.timings.get("reward", 0.0)
        t["timing_s/gen"] = t["timing_s/gen"] - t["timing_s/reward"]
        sync = next((r for r in to_rollout if r["phase"] == "sync"), None)
        t["timing_s/update_weights"] = sync["seconds"] if sync else 0.0
        t["timing_s/wake"] = t["timing_s/wake"] - t["timing_s/update_weights"]
        t.setdefault("timing_s/ref", None)
        t["timing_s/save_checkpoint"] = None
        m.update(t)
        report = sync["sync"] if sync else None
        m.update(
            {
                "sync/bytes_moved": report.bytes_moved if report else None,
                "sync/seconds": report.seconds if report else None,
                "sync/num_tensors": report.num_tensors if report else None,
                "sync/complete": float(report.complete) if report else None,
                "sync/zero_copy": float(report.zero_copy) if report else None,
            }
        )
        sleep = next((r["sleep"] for r in to_train if r["phase"] == "sleep-rollout"), None)
        m["sleep/supported"] = float(sleep.supported) if sleep else None
        m["sleep/freed_bytes"] = sleep.freed_bytes if sleep else None

        peak = None
        if self.device.type == "cuda":
            from engine.metrics import peak_flops

            peak = peak_flops(self.device, self.trainer.compute_dtype or next(self.model.parameters()).dtype)
        m.update(
            throughput_metrics(
                t,
                rollout_tokens=m["rollout/generated_tokens"],
                train_tokens=int(train["actor/num_packed_tokens"] * cfg.trainer.ppo_epochs),
                train_flops=train["perf/train_flops"],
                peak=peak,
            )
        )
        return m
