"""The colocated training loop: rollout on the engine, Flow-GRPO update, weight sync, every phase measured.

Building a run (`TrainLoop.__init__`) calls the builders of `engine.build` in order: the planner's
directory (a local HF directory, or the tiny model built into `run_dir/model`, or none for random
weights of a Qwen2.5 architecture made on the device), the tokenizer, the model, the rollout engine
(vLLM when importable and there is a directory, else the embedded engine, which samples from the
trainer's own model object), then resolves what depends on the built parts (the planner's action
set becomes the trainer's `allowed_token_ids`, so both sides use one restricted softmax; the loss
implementation falls back to "reference" when this build of `kernels` lacks the fused LM-head op,
and says so), then the trainer (its frozen reference, when kl_coef > 0, is a copy of the *base*
weights, taken before any checkpoint is loaded) and the `DeviceMemoryManager` that owns the
rollout ↔ train order, and finally restores the newest complete checkpoint or starts over.

One step (`TrainLoop.step`), phases as in `engine.timer.PHASES` (self-times; gen ⊃ reward,
wake ⊃ update_weights):

    gen        B queries × G trajectories through the four-agent loop (`agentflow.runner`)
    adv        group-normalised rewards broadcast to every planner turn (`engine.advantage`)
    sleep      the engine sleeps, trainer state back on the device
    pack, old_log_prob, ref, update_actor      `Trainer.update` (ref only when kl_coef > 0)
    gap_probe  the rollout/trainer gap on `gap_probe_seqs` sequences, before and after the sync, on
               step 1 and every `gap_probe_every`-th step (`sync/gap_probed`; the gap keys are null otherwise)
    wake       trainer state off the device, engine weights awake, sync (update_weights), KV cache awake
    validate   every `val_every` steps and at the last: greedy, on the synced engine (`engine.eval`); a new
               best accuracy saves the weights to run_dir/best/checkpoints/step_N
    save_checkpoint    every `save_every` steps and at the last step

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

Helpers (`HelperConfig`, built by `engine.build.build_helper` after the trainer, since the
"reference" helper is the trainer's frozen reference model): with "policy" every role runs on the
policy engine and follows the trained weights; with any other kind the query analysis, executor,
verifier, generator, base_generator tool and LLM judge run on weights no update touches, and only
the planner's calls are trained (AgentFlow's setting). A helper that can sleep (a second vLLM
engine) is woken at the start of `gen` and sleeps (level 1) at the start of `sleep` (spans).

Several processes (torchrun, `engine.ranks`): each rank shards the trainer with FSDP2 (`shard_planner`)
and builds its own rollout engine (vLLM joining the trainer's process group, tensor-parallel over
`tp` ranks, or the embedded engine on a private copy of the weights); it rolls out its rollout
group's slice of the B queries, trains on its share of the group's planner turns and syncs
`engine.parallelize.full_parameters` (one FSDP group gathered at a time) into its own engine. The
step's metrics are combined over the ranks (`RankLayout.combine`); rank 0 alone prints, writes
config.json, metrics.jsonl and `ranks.jsonl` (every rank's phase times per step), and builds the
tiny model before the other ranks read it. With tp > 1 the rollout runs lock-step (the continuous
scheduler's order depends on thread timing, and the ranks of one engine must make identical calls).
Checkpoints are sharded (`engine.dist_checkpoint.save_sharded`, every rank writes its FSDP shard of
the weights and AdamW state) and hold the same state as a single-process one, with the *combined*
metrics line and every rank's `ranks.jsonl` row; `resume` loads the newest one that verifies on every
rank (`latest_sharded` + `load_sharded`), on any world size: DCP reshards, so a 2-rank checkpoint
resumes on 1 or 4 processes (RNG states come back only on the same world size), and a one-process
run resumes a sharded checkpoint the same way. A single-process checkpoint does not resume on
several processes (its optimizer state is keyed by parameter index, not by name). The best
checkpoint stays one full safetensors directory, gathered on rank 0 (weights only, loadable as a
Hugging Face model by `flowgrpo eval`/`solve`, and no bigger than the model; a sharded one would
need DCP to read it back).

Simplifications: one device per process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from agentflow.agents import Caller, Planner
from agentflow.chat import stop_ids
from agentflow.runner import RoleModels, RolloutResult, build_tools, run_trajectories
from agentflow.tasks import load_queries, load_task
from agentflow.tasks.query import Query
from agentflow.tools.search import open_index
from engine.advantage import group_advantages, train_sequences
from engine.attention import choose_backend, packed_attention_of
from engine.build import (
    build_engine,
    build_helper,
    build_planner,
    build_tokenizer,
    check_recipe_fits,
    choose_engine,
    planner_dir,
    shard_planner,
)
from engine.checkpoint import CHECKPOINTS, Checkpoint, load_checkpoint, load_latest, save_checkpoint
from engine.device_memory import DeviceMemoryManager, HostOffloader, PhaseMemory, nvml
from engine.dist_checkpoint import latest_sharded, load_sharded, save_sharded
from engine.eval import evaluate
from engine.fsio import atomic_write_bytes
from engine.logprob_gap import trainer_logprobs
from engine.metrics import (
    COLUMNS,
    ConsoleReporter,
    MetricsWriter,
    StepRecord,
    json_safe,
    peak_flops,
    read_metrics,
    step_trace,
)
from engine.model import num_parameters, resolve_dtype
from engine.packing import TrainSequence
from engine.parallelize import SINGLE, DataParallel, full_parameters
from engine.presets import RunConfig
from engine.ranks import RANK_TIMING_FILE, RankLayout, single_process_metrics
from engine.rollout.protocol import SamplingConfig, TransientWeights
from engine.timer import PhaseTimer
from engine.trainer import Trainer
from kernels.linear_chunked import resolve_algorithm

BEST = "best"  # run_dir/best/checkpoints/step_N: the weights with the best validation accuracy so far
VALIDATION_FILE = "validation.jsonl"  # one line per validation (including the one before training)
# per rank in ranks.jsonl (several processes): phase times, the rank's own gaps, the sum of the weights it synced
RANK_KEYS = ("timing_s/", "sync/gap_", "training/rollout_logprob_diff_", "sync/weights_sum", "rollout/num_")


def _val_line(m: dict[str, Any]) -> str:
    per = "  ".join(f"{k.split('/', 1)[1].rsplit('/', 1)[0]} {v:.3f}" for k, v in m.items() if k.count("/") == 2)
    return f"accuracy {m['val/accuracy']:.3f} over {m['val/num_queries']} queries ({per})"


def fused_loss_available() -> bool:
    import kernels

    return hasattr(kernels, "linear_flow_grpo_loss") and hasattr(kernels, "linear_token_logprobs")


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double().cpu() - b.double().cpu()).abs()
    return d.mean().item(), d.max().item()


class _Discard:
    """The metrics writer of every rank but 0: nothing is written."""

    path = None

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, **metrics}

    def close(self) -> None:
        pass


class TrainLoop:
    """One training run of `config` (see the module doc); `run()` executes the remaining steps."""

    def __init__(
        self, config: RunConfig, *, resume: bool = False, out: TextIO | None = None, dp: DataParallel = SINGLE
    ) -> None:
        self.ranks = RankLayout(dp, config.rollout.tensor_parallel_size)
        self.out = out or sys.stdout
        if not self.ranks.is_main:
            self.out = open(os.devnull, "w")  # noqa: SIM115 (for the life of the loop)
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.t_start = time.perf_counter()
        mc = config.model
        cuda = f"cuda:{dp.local_rank}" if dp.enabled else "cuda"
        self.device = torch.device(mc.device or (cuda if torch.cuda.is_available() else "cpu"))
        choose_backend(self.device, resolve_dtype(mc.dtype), mc.attention)  # an unavailable --attention: one line, now
        torch.manual_seed(config.seed)
        # data files are read (and a bad one refused) before any model is built
        self.train_queries = load_queries(config.task.data, config.task.spec()) if config.task.data else None
        self.val_queries = [q for f in config.task.val_data for q in load_queries(f, config.task.spec())]
        # the planner, its tokenizer and the rollout engine (the engine choice may reject the model source)
        with self._main_rank_first():  # rank 0 builds the index, tiny model and tokenizer files the others read
            if config.agent.search_corpus and "search" in config.agent.tools:
                index = open_index(config.agent.search_corpus, config.agent.search_index_dir)
                how = "loaded" if index.built_s is None else f"built in {index.built_s:.1f}s"
                self.notes.append(
                    f"search corpus {config.agent.search_corpus}: {index.num_passages} passages, index {how}"
                )
            self.model_dir = planner_dir(mc, self.run_dir, self.notes)
            if config.preset == "agentflow":
                check_recipe_fits(config, self.model_dir, self.device)
            self.engine_name, why = choose_engine(config.rollout.engine, self.model_dir)
            self.tokenizer = build_tokenizer(mc, self.model_dir, self.run_dir, self.notes)
        self.model = build_planner(mc, self.model_dir, self.tokenizer, self.device, config.seed, self.notes)
        self.num_params = num_parameters(self.model)
        self.notes.append(f"attention {packed_attention_of(self.model).name} (asked: {mc.attention})")
        self.notes.append(f"engine {self.engine_name}: {why}")
        distributed = self.ranks.distributed
        self.engine = build_engine(
            self.engine_name,
            config.rollout,
            model_dir=self.model_dir,
            dtype=mc.dtype,
            seed=config.seed + self.ranks.group,
            max_model_len=config.agent.context_budget,
            model=copy.deepcopy(self.model) if distributed else self.model,  # FSDP shards the trainer's
            tokenizer=self.tokenizer,
            external_tp=self.ranks.tp if distributed else None,
        )
        self.config = self._resolve(config)
        self.trainer, self.memory = self._build_trainer()
        self.helper = build_helper(
            config.helper,
            config.rollout,
            policy_engine=self.engine,
            model_dir=self.model_dir,
            reference_model=self.trainer.ref_model,
            tokenizer=self.tokenizer,
            dtype=mc.dtype,
            seed=config.seed,
            max_model_len=config.agent.context_budget,
            notes=self.notes,
        )
        self.helper_sleeps = config.helper.kind == "vllm"  # a second engine with its own device memory
        self.start_step, self.writer = self._restore(resume)
        main = self.ranks.is_main
        self.val_writer = (
            MetricsWriter(self.run_dir, resume_step=self.start_step - 1, filename=VALIDATION_FILE)
            if main
            else _Discard()
        )
        self.rank_writer = (
            MetricsWriter(self.run_dir, resume_step=self.start_step - 1, filename=RANK_TIMING_FILE)
            if main and distributed
            else _Discard()
        )
        best = load_latest(self.run_dir / BEST) if resume else None
        self.best_val = best.state.get("val/accuracy") if best is not None else None
        if main:
            atomic_write_bytes(self.run_dir / "config.json", (self.config.to_json() + "\n").encode())
        self.weights_sum: float | None = None  # of the last sync's weights (several processes)
        self.rollout_queue: list | None = None  # the last rollout's queue-depth samples (for the Chrome trace)

    # ---- building ----

    @contextlib.contextmanager
    def _main_rank_first(self):
        """The block runs on rank 0 first, then on the other ranks (one barrier on each rank)."""
        if not self.ranks.is_main:
            self.ranks.barrier()
        yield
        if self.ranks.is_main:
            self.ranks.barrier()

    def _weights(self):
        """The trainer's HF-named weights for the sync: whole, or gathered one FSDP group at a time (transient:
        a group's gathered storage is freed when it reshards, so the engine copies each tensor as it comes)."""
        return TransientWeights(self._gathered()) if self.ranks.distributed else self.model.named_parameters()

    def _gathered(self):
        """Full tensors from the FSDP shards, not copied; their float64 sum goes to `ranks.jsonl`."""
        self.weights_sum = None
        total = 0.0
        for name, t in full_parameters(self.model):
            total += float(t.sum(dtype=torch.float64))
            yield name, t
        self.weights_sum = total

    def _resolve(self, config: RunConfig) -> RunConfig:
        """The trainer settings that depend on the built parts: the action set and the loss implementation."""
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
            algorithm = resolve_algorithm(trainer_cfg.lm_head_algorithm, self.device)  # "auto": measured per device
            trainer_cfg = dataclasses.replace(trainer_cfg, lm_head_algorithm=algorithm)
            self.notes.append(
                f"loss {trainer_cfg.loss_impl}, LM head {algorithm} (asked: {config.trainer.lm_head_algorithm})"
            )
        if self.ranks.tp > 1 and config.agent.schedule != "lockstep":
            config = dataclasses.replace(config, agent=dataclasses.replace(config.agent, schedule="lockstep"))
            self.notes.append(
                f"rollout schedule lockstep: the {self.ranks.tp} ranks of a tensor-parallel engine must make identical calls"
            )
        if self.ranks.distributed:
            r = self.ranks
            self.notes.append(
                f"{r.dp.world} processes on {r.dp.nodes} node{'s' * (r.dp.nodes > 1)}: FSDP2 trainer on the "
                f"{r.describe_mesh()}, {r.num_groups} rollout groups of tp {r.tp} ranks, "
                f"{config.task.queries_per_step // r.num_groups} queries each; this is rank {r.dp.rank} (group {r.group}); "
                f"sharded checkpoints (torch.distributed.checkpoint)"
            )
        self.planner_sampling = SamplingConfig(
            max_new_tokens=min(config.agent.planner_max_new_tokens, 8),
            temperature=config.agent.temperature,
            stop_token_ids=stop_ids(self.tokenizer),
            allowed_token_ids=trainer_cfg.allowed_token_ids,
        )
        return dataclasses.replace(config, trainer=trainer_cfg)

    def _build_trainer(self) -> tuple[Trainer, DeviceMemoryManager]:
        """The trainer (reference copy taken here, from the base weights) and the memory hand-over."""
        if self.ranks.distributed:
            self.model, ref = shard_planner(self.model, self.config.trainer.kl_coef, self.ranks.dp)
            trainer = Trainer(self.model, self.config.trainer, ref_model=ref, dp=self.ranks.dp)
        else:
            trainer = Trainer(self.model, self.config.trainer)
        rc = self.config.rollout
        offload = rc.offload_optimizer if rc.offload_optimizer is not None else self.device.type == "cuda"
        offloader = HostOffloader(trainer.optimizer, grads="release", device=self.device) if offload else None
        memory = DeviceMemoryManager(
            engine=self.engine, offloader=offloader, sleep_level=rc.sleep_level, device=self.device
        )
        return trainer, memory

    def _restore(self, resume: bool) -> tuple[int, MetricsWriter]:
        """Load the newest complete checkpoint (resume) or clear an earlier run; the first step and the writer."""
        main, dp = self.ranks.is_main, self.ranks.dp
        ck = None
        if resume:  # the same verdict on every rank (each hashes its share of the files)
            ck = (
                latest_sharded(self.run_dir, dp, self.notes)
                if dp.enabled
                else load_latest(self.run_dir, notes=self.notes)
            )
            if ck is None:
                self.notes.append(f"--resume: no complete checkpoint in {self.run_dir}, starting at step 1")
        if not resume and main:
            self._clear_previous_run()
        self.ranks.barrier()  # the earlier run's files are gone before any rank writes
        if ck is None:
            return 1, MetricsWriter(self.run_dir) if main else _Discard()
        self._load(ck)
        sharded = f", a sharded checkpoint of {ck.world} process{'es' * (ck.world > 1)}" if ck.layout == "dcp" else ""
        self.notes.append(f"resumed from {ck.path} (step {ck.step}){sharded}")
        if not main:
            return ck.step + 1, _Discard()
        writer = MetricsWriter(self.run_dir, resume_step=ck.step)
        if not any(r.get("step") == ck.step for r in read_metrics(writer.path)) and ck.state.get("metrics"):
            writer.write(ck.step, ck.state["metrics"])  # killed between the checkpoint and its metrics line
            self.notes.append(f"metrics line of step {ck.step} restored from its checkpoint")
            if self.ranks.distributed and ck.state.get("ranks") is not None:
                rank_writer = MetricsWriter(self.run_dir, resume_step=ck.step, filename=RANK_TIMING_FILE)
                if not any(r.get("step") == ck.step for r in read_metrics(rank_writer.path)):
                    rank_writer.write(ck.step, {"ranks": ck.state["ranks"]})
                rank_writer.close()
        return ck.step + 1, writer

    def _load(self, ck: Checkpoint) -> None:
        """Weights, optimizer and RNG state from `ck`: a sharded one on any world size, a single-process one
        on one process."""
        if ck.layout == "single" and self.ranks.distributed:
            raise ValueError(
                f"{ck.path} was written by a single-process run and cannot resume on {self.ranks.dp.world} processes; "
                f"resume it without --nproc-per-node (its next checkpoint is the same kind)"
            )
        if ck.layout == "single":
            load_checkpoint(ck, self.model, self.trainer.optimizer)
        else:
            load_sharded(ck, self.model, self.trainer.optimizer, self.ranks.dp, notes=self.notes)

    def _clear_previous_run(self) -> None:
        old = []
        if (self.run_dir / CHECKPOINTS).exists():
            shutil.rmtree(self.run_dir / CHECKPOINTS)
            old.append(CHECKPOINTS + "/")
        if (self.run_dir / BEST).exists():
            shutil.rmtree(self.run_dir / BEST)
            old.append(BEST + "/")
        for p in [
            self.run_dir / "metrics.jsonl",
            self.run_dir / VALIDATION_FILE,
            *self.run_dir.glob("trace_step_*.json"),
        ]:
            if p.exists():
                p.unlink()
                old.append(p.name)
        if old:
            self.notes.append(
                f"starting over in {self.run_dir}: removed the earlier run's {', '.join(old)} "
                f"(pass --resume to continue a run instead)"
            )

    # ---- the steps ----

    def queries(self, step: int) -> list[Query]:
        """The step's B queries: a built-in task seeded by (run seed, step), or the next B of the data file."""
        tc = self.config.task
        if self.train_queries is None:
            return load_task(tc.name, tc.queries_per_step, seed=self.config.seed * 100_003 + step)
        data = self.train_queries
        start = (step - 1) * tc.queries_per_step
        return [data[(start + i) % len(data)] for i in range(tc.queries_per_step)]

    def header(self) -> list[str]:
        mc, tc = self.config.model, self.config.task
        nv = nvml()
        arch = mc.arch if self.model_dir is None else self.model.config.model_type  # a --model dir names its own
        return [
            f"flowgrpo train · preset {self.config.preset} · run dir {self.run_dir} · "
            f"steps {self.start_step}..{self.config.steps}",
            f"  model   {arch} ({self.num_params / 1e6:.2f}M params, {mc.dtype}) on {self.device}"
            + (f" from {self.model_dir}" if self.model_dir else ""),
            f"  task    {tc.data or tc.name}: {tc.queries_per_step} queries x G={tc.group_size} per step",
            "  memory  nvml " + ("ok" if nv.reason is None else f"unavailable ({nv.reason})"),
            *(f"  note    {n}" for n in self.notes),
            "  resolved config (also in config.json):",
            *(f"    {line}" for line in self.config.summary_lines()),
        ]

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
            self.memory.to_rollout(weights=self._weights)
            if cfg.task.val_before_train:
                before = self._validate(self.start_step - 1)
                print(f"validation before step {self.start_step}: {_val_line(before)}", file=self.out, flush=True)
            for step in range(self.start_step, cfg.steps + 1):
                trace = cfg.trace_step if self.ranks.is_main else None
                with step_trace(self.run_dir, step, trace, queue=lambda: self.rollout_queue):
                    last = self.step(step)
        finally:
            self.reporter.close()
            self.writer.close()
            self.val_writer.close()
            self.rank_writer.close()
        print(
            f"done: {cfg.steps} steps in {time.perf_counter() - self.t_start:.1f}s; metrics in {self.writer.path}",
            file=self.out,
        )
        return last

    def step(self, step: int) -> dict[str, Any]:
        """One step, top to bottom: rollout → advantages → update → sync → record → checkpoint."""
        cfg = self.config
        snapshots = PhaseMemory(self.device)
        progress = lambda name, event: event == "enter" and self.reporter.progress(step, name)
        timer = PhaseTimer(self.device, hooks=[progress, snapshots])
        gaps: dict[str, float | None] = {}
        self.memory.history.clear()
        with timer.phase("step"):
            queries = self.ranks.queries(self.queries(step))
            stats_before = self.engine.stats()
            with timer.phase("gen"), self.memory.phase("rollout"):
                if self.helper_sleeps:
                    with timer.span("helper-wake"):
                        self.helper.wake()
                result = run_trajectories(
                    self.role_models(),
                    queries,
                    cfg.task.group_size,
                    cfg.agent,
                    seed=cfg.seed * 1_000_003 + step,
                    timer=timer,
                )
            stats_after = self.engine.stats()
            self.rollout_queue = result.stats.get("queue")
            with timer.phase("adv"):
                seqs, adv_metrics = self._sequences(result, queries)
            with timer.phase("sleep"):
                if self.helper_sleeps:
                    with timer.span("helper-sleep"):
                        self.helper.sleep(1)
                to_train = self.memory.to_train(timer)
            with self.memory.phase("train"):
                train = self.trainer.update(self.ranks.train_share(seqs), timer=timer)
            probe = cfg.gap_probe_seqs > 0 and (step == 1 or step % cfg.gap_probe_every == 0)
            gaps["sync/gap_probed"] = float(probe)
            with timer.phase("gap_probe") if probe else contextlib.nullcontext():
                gaps.update(self._stale_gap(seqs) if probe else {})
            with timer.phase("wake"):
                to_rollout = self.memory.to_rollout(weights=self._weights, timer=timer)
            with timer.phase("gap_probe") if probe else contextlib.nullcontext():
                gaps.update(self._after_sync_gap(seqs, step) if probe else {})
            validation: dict[str, Any] = {}
            if cfg.task.val_every and (step % cfg.task.val_every == 0 or step == cfg.steps):
                with timer.phase("validate"):
                    validation = self._validate(step)

            def record() -> dict[str, Any]:
                return StepRecord(
                    step=step,
                    rollout=result,
                    group_size=cfg.task.group_size,
                    engine_name=self.engine_name,
                    helper=cfg.helper.kind,
                    engine_stats=(stats_before, stats_after),
                    advantages=adv_metrics,
                    train=train,
                    loss_impl=cfg.trainer.loss_impl,
                    gaps=gaps,
                    timings=timer.collect(),
                    sync=next((r["sync"] for r in to_rollout if "sync" in r), None),
                    sleep=next((r["sleep"] for r in to_train if "sleep" in r), None),
                    memory={**snapshots.snapshots, **{r["phase"]: r["memory"] for r in self.memory.history}},
                    train_tokens=int(train["actor/num_packed_tokens"] * cfg.trainer.ppo_epochs),
                    peak_flops=peak_flops(self.device, self.trainer.compute_dtype or self.model.dtype),
                    elapsed_s=time.perf_counter() - self.t_start,
                    validation=validation,
                ).to_metrics()

            if step % cfg.save_every == 0 or step == cfg.steps:
                with timer.phase("save_checkpoint"):
                    self._save(step, *self._line(record()))
        metrics, rank_rows = self._line(record())
        if rank_rows is not None:
            self.rank_writer.write(step, {"ranks": rank_rows})
        metrics = self.writer.write(step, metrics)
        self.reporter.step_done(step, metrics)
        return metrics

    def _line(self, metrics: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """The step's metrics line (combined over the ranks: collective) and every rank's `ranks.jsonl` row."""
        if not self.ranks.distributed:
            return {**metrics, **single_process_metrics(metrics)}, None
        metrics = {**metrics, "sync/weights_sum": self.weights_sum}
        line, rows = self.ranks.combine(metrics)
        line.pop("sync/weights_sum")
        return line, [{k: r[k] for k in r if k.startswith(RANK_KEYS)} for r in rows]

    def _save(self, step: int, line: dict[str, Any], rank_rows: list[dict[str, Any]] | None) -> None:
        """Checkpoint `step` holding its metrics line (and rank rows): sharded on every rank, or one directory."""
        cfg = self.config
        # a skipped update (non-finite grad norm) leaves inf in the line: stored as null, as metrics.jsonl has it
        state = {"preset": cfg.preset, "engine": self.engine_name, "metrics": json_safe(line)}
        if self.ranks.distributed:
            state["ranks"] = rank_rows
            save_sharded(
                self.run_dir, step, self.model, self.trainer.optimizer, state, self.ranks.dp, keep_last=cfg.keep_last
            )
        else:
            save_checkpoint(self.run_dir, step, self.model, self.trainer.optimizer, state, keep_last=cfg.keep_last)

    def role_models(self) -> RoleModels:
        """The planner on the policy engine; every other role on the helper (the same engine for "policy")."""
        if self.helper is self.engine:
            return RoleModels(planner=self.engine)
        return RoleModels.helped(self.engine, self.helper)

    def _sequences(self, result: RolloutResult, queries: list[Query]) -> tuple[list[TrainSequence], dict]:
        g = self.config.task.group_size
        trajs = result.trajectories
        for i, tr in enumerate(trajs):
            if tr.query_id != queries[i // g].id:
                raise RuntimeError(f"trajectory {i} is of query {tr.query_id}, expected {queries[i // g].id}")
        group_ids = [i // g for i in range(len(trajs))]
        ac = self.config.advantage
        turns = [len(tr.turns) for tr in trajs] if ac.grouping == "turn" else None
        adv, stats = group_advantages([tr.reward for tr in trajs], group_ids, eps=ac.eps, turns=turns)
        seqs = train_sequences([tr.turns for tr in trajs], adv, group_ids)
        if not seqs:
            raise RuntimeError(
                "the step produced no planner turns: every trajectory ran out of context before its first turn; "
                f"raise the agent's context_budget (now {self.config.agent.context_budget})"
            )
        out = stats.as_metrics()
        out["adv/zero_var_group_frac"] = stats.num_zero_var_groups / max(1, stats.num_groups)
        return seqs, out

    def _validate(self, step: int) -> dict[str, Any]:
        """Greedy rollouts of every validation query (one each); val/<source>/accuracy, val/accuracy. The
        weights of a step that beats the best accuracy so far go to run_dir/best (the best checkpoint)."""
        agent = dataclasses.replace(self.config.agent, temperature=0.0)
        by_source: dict[str, list[Query]] = {}
        for q in self.val_queries:
            by_source.setdefault(q.source, []).append(q)
        with self.memory.phase("validate"):
            rows, _ = evaluate(RoleModels(planner=self.engine), by_source, agent, seed=self.config.seed * 7 + step)
        rows = rows[: len(by_source)]  # without the pooled row
        out: dict[str, Any] = {f"val/{r.name}/accuracy": r.accuracy for r in rows}
        out["val/accuracy"] = sum(r.correct for r in rows) / len(self.val_queries)
        out["val/num_queries"] = len(self.val_queries)
        self.val_writer.write(step, out)
        # rank 0's accuracy decides for every rank (saving the best is collective with several processes)
        accuracy = self.ranks.gather(out["val/accuracy"])[0]
        if step >= 1 and (self.best_val is None or accuracy > self.best_val):
            self.best_val = accuracy
            state = {"val/accuracy": self.best_val, "preset": self.config.preset, "validation": out}
            self._save_best(step, state)
        return out

    def _save_best(self, step: int, state: dict[str, Any]) -> None:
        """run_dir/best/checkpoints/step_N: the full weights in one directory (gathered on rank 0 under FSDP)."""
        if not self.ranks.distributed:
            save_checkpoint(self.run_dir / BEST, step, self.model, None, state, keep_last=1)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        error = None
        if self.ranks.is_main:
            try:
                save_checkpoint(self.run_dir / BEST, step, self.model, None, state, keep_last=1, state_dict=full)
            except OSError as e:  # e.g. a full disk: raised on every rank below, none left waiting
                error = f"saving the best checkpoint of step {step} failed: {e}"
        del full
        error = self.ranks.gather(error)[0]  # rank 0's outcome, on every rank (also the barrier)
        if error is not None:
            raise OSError(error)

    def _probe_count(self, seqs: list[TrainSequence]) -> int:
        """Sequences a gap probe takes: gap_probe_seqs, or fewer when a rank has fewer (forwards are collective)."""
        k = min(self.config.gap_probe_seqs, len(seqs))
        return self.ranks.all_min(k) if self.ranks.distributed else self.config.gap_probe_seqs

    def _stale_gap(self, seqs: list[TrainSequence]) -> dict[str, float | None]:
        """The engine's log-probs (pre-update weights) vs the updated policy, on the same tokens."""
        k = self._probe_count(seqs)
        if k == 0:
            return {"sync/gap_stale_mean": None, "sync/gap_stale_max": None}
        batch = self.trainer.prepare(seqs[:k])
        mbs = batch.micro_batches
        new = torch.cat(self.trainer.compute_logprobs(mbs, pad=sum(batch.pads)))
        mean, mx = _gap(torch.cat([mb.rollout_logprobs for mb in mbs]), new)
        return {"sync/gap_stale_mean": mean, "sync/gap_stale_max": mx}

    def _after_sync_gap(self, seqs: list[TrainSequence], step: int) -> dict[str, float | None]:
        """Fresh samples from the just-synced engine vs the trainer's log-probs of them."""
        k = self._probe_count(seqs)
        if k == 0:
            return {"sync/gap_after_mean": None, "sync/gap_after_max": None}
        sampling = dataclasses.replace(self.planner_sampling, seed=self.config.seed * 7_919 + step)
        gens = self.engine.generate([s.prompt_ids for s in seqs[:k]], sampling)
        lps = trainer_logprobs(self.model, gens, sampling)
        mean, mx = _gap(torch.tensor([x for g in gens for x in g.logprobs]), torch.cat(lps))
        return {"sync/gap_after_mean": mean, "sync/gap_after_max": mx}
