"""`flowgrpo train` end to end on CPU with the tiny model: steps, metrics, weight change and sync, resume, kill, trace.

The runs use the toy preset shrunk to seconds (3 queries x G=4, one-token planner, rule-based agents)
because a random planner earns no reward on the tiny preset's task, so nothing would change there;
the tiny preset itself runs once through the CLI, as `make run` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint, load_latest
from engine.loop import TrainLoop
from engine.metrics import STEP_KEYS, is_declared, read_metrics
from engine.preflight import UsageError
from engine.presets import TOY_TOOLS, RunConfig, preset, toy
from engine.tiny import TinyConfig, make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("toy") / "model"
    make_tiny(out, TinyConfig(extra_tokens=TOY_TOOLS))
    return str(out)


def small_toy(run_dir: Path, model_dir: str, engine: str, **kw) -> RunConfig:
    cfg = toy(run_dir=str(run_dir))
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=model_dir),
        rollout=dataclasses.replace(cfg.rollout, engine=engine, kv_cache_bytes=16 << 20),
        task=dataclasses.replace(cfg.task, queries_per_step=3, group_size=4),
        trainer=dataclasses.replace(cfg.trainer, lr=1e-2),
        **{"steps": 2, "seed": 1, **kw},
    )


def base_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


# Keys that are null by design on this machine or in this configuration (CPU, no reference model).
MAY_BE_NULL = {
    "timing_s/ref",
    "timing_s/old_log_prob",  # one optimizer step per rollout: no separate old pass (engine.trainer)
    "timing_s/save_checkpoint",
    "perf/mfu/actor",
    "perf/max_memory_allocated_gb",
    "perf/max_memory_reserved_gb",
    "sleep/freed_bytes",
    "helper/wake_s",
    "helper/sleep_s",
    "reward/judge_rule_matched",
    "reward/judge_asked",
    "reward/judge_unparsed",
    # the gap probes run on step 1 and every gap_probe_every-th step (sync/gap_probed says which)
    "timing_s/gap_probe",
    "sync/gap_stale_mean",
    "sync/gap_stale_max",
    "sync/gap_after_mean",
    "sync/gap_after_max",
    # trajectory latency is measured by the continuous scheduler only (lock-step: every answer comes last)
    "rollout/latency_p50_s",
    "rollout/latency_p90_s",
    "timing_s/validate",
}


def check_lines(rows: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in rows] == steps
    for r in rows:
        missing = [k for k in STEP_KEYS if k not in r]
        assert not missing, f"step {r['step']}: metrics without {missing}"
        undeclared = [k for k in r if not is_declared(k)]
        assert not undeclared, f"step {r['step']}: keys written but not declared in STEP_KEYS: {undeclared}"
        never = [k for k in STEP_KEYS if r[k] is None and k not in MAY_BE_NULL]
        assert not never, f"step {r['step']}: declared keys never filled in: {never}"
        assert 0.0 <= r["reward/success_rate"] <= 1.0
        assert r["timing_s/step"] > 0 and r["timing_s/gen"] > 0 and r["timing_s/update_actor"] > 0
        phases = (
            "gen",
            "reward",
            "adv",
            "sleep",
            "pack",
            "old_log_prob",
            "update_actor",
            "gap_probe",
            "wake",
            "update_weights",
            "save_checkpoint",
        )
        assert sum(r[f"timing_s/{p}"] or 0.0 for p in phases) <= r["timing_s/step"] * 1.001
        assert r["rollout/num_trajectories"] == 12 and r["rollout/response_length_mean"] == 1.0
        assert r["perf/rollout_tokens_per_s"] > 0 and r["perf/train_tokens_per_s"] > 0
        assert r["perf/cpu_memory_used_gb"] > 0 and r["memory/update_actor/rss_gb"] > 0
        if not torch.cuda.is_available():
            assert r["perf/mfu/actor"] is None and r["perf/max_memory_allocated_gb"] is None
        assert r["actor/loss_impl"] in ("fused", "reference")
        gap_keys = [f"sync/gap_{w}_{s}" for w in ("stale", "after") for s in ("mean", "max")] + ["timing_s/gap_probe"]
        if r["sync/gap_probed"]:
            assert all(r[k] is not None for k in gap_keys)
        else:
            assert all(r[k] is None for k in gap_keys)
        assert r["actor/old_logprob_fused"] == 1.0 and r["timing_s/old_log_prob"] is None


def test_two_steps_on_the_embedded_engine(tmp_path, toy_model_dir):
    from bench.curves import plot_training_curve

    cfg = small_toy(tmp_path / "run", toy_model_dir, "embedded", trace_step=2)
    loop = TrainLoop(cfg)
    assert loop.engine_name == "embedded"
    last = loop.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    check_lines(rows, [1, 2])
    assert rows[-1] == last
    # the planner's weights changed; the engine samples from the same tensors (zero-copy sync)
    base = base_weights(toy_model_dir)
    changed = [n for n, p in loop.model.named_parameters() if not torch.equal(p.detach(), base[n])]
    assert len(changed) == len(list(loop.model.parameters()))
    assert all(r["sync/zero_copy"] == 1.0 and r["sync/bytes_moved"] == 0 and r["sync/complete"] for r in rows)
    assert max(r["training/rollout_logprob_diff_max"] for r in rows) < 1e-4  # float32: observed ~5e-7
    assert all(r["adv/num_groups"] == 3 for r in rows) and sum(r["adv/adv_abs_mean"] for r in rows) > 0
    # restricted action set on both sides: 4 choices, so the entropy is at most ln 4
    assert all(0 < r["actor/entropy"] <= 1.3863 for r in rows)
    # checkpoints, config, trace
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["trainer"]["allowed_token_ids"] == list(loop.trainer.config.allowed_token_ids)
    trace = json.loads((tmp_path / "run" / "trace_step_2.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"gen", "update_actor", "wake"} <= names and "old_log_prob" not in names  # one optimizer step
    assert not (tmp_path / "run" / "trace_step_1.json").exists()
    png = plot_training_curve(tmp_path / "run", tmp_path / "curve.png", title="test")
    assert png.stat().st_size > 10_000


def test_two_steps_on_vllm_and_the_engine_follows_the_weights(tmp_path, toy_model_dir):
    pytest.importorskip("vllm")
    cfg = small_toy(tmp_path / "run", toy_model_dir, "vllm", gap_probe_every=1)
    loop = TrainLoop(cfg)
    assert loop.engine_name == "vllm"
    loop.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    check_lines(rows, [1, 2])
    n_bytes = sum(p.numel() * 4 for p in loop.model.parameters())
    for r in rows:
        assert r["sync/complete"] == 1.0 and r["sync/bytes_moved"] == n_bytes and r["sync/zero_copy"] == 0.0
        # before the sync the engine's log-probs trail the updated policy; right after it they match it
        assert r["sync/gap_stale_max"] > 1e-3, "the update must move the policy (else the check below is vacuous)"
        assert r["sync/gap_after_max"] < 1e-4 < r["sync/gap_stale_max"] / 100  # float32: observed ~3e-7
        # every step's rollout came from synced weights: engine and trainer agree on the old log-probs
        assert r["training/rollout_logprob_diff_max"] < 1e-4
    assert rows[-1]["sleep/supported"] == 0.0  # vLLM's sleep mode is CUDA-only

    # negative control: change the trainer's weights without a sync and the same probe sees the gap
    with torch.no_grad():
        for p in loop.model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std().clamp(min=1e-3))
    stale = loop._after_sync_gap(loop_sequences(loop), step=99)
    assert stale["sync/gap_after_max"] > 1e-3
    loop.engine.sync_weights(loop.model.named_parameters())
    assert loop._after_sync_gap(loop_sequences(loop), step=99)["sync/gap_after_max"] < 1e-4


def loop_sequences(loop: TrainLoop):
    from engine.packing import TrainSequence

    prompt = loop.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Query: What is 3 + 4?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return [TrainSequence(prompt, [loop.tokenizer.eos_token_id], [0.0], 0.0)] * 4


def test_resume_continues_the_step_count_and_drops_later_metrics(tmp_path, toy_model_dir):
    run = tmp_path / "run"
    cfg = small_toy(run, toy_model_dir, "embedded", steps=3, gap_probe_seqs=0)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, kl_coef=0.01))
    TrainLoop(cfg).run()
    # step 3's checkpoint "never completed": the resumed run must redo step 3, not duplicate it
    ck2 = next(c for c in list_checkpoints(run) if c.step == 2)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000003")
    resumed = TrainLoop(dataclasses.replace(cfg, steps=4), resume=True)
    assert resumed.start_step == 3
    # the weights are the checkpoint's, the reference policy is the base model
    from engine.model import load_planner

    twin_model = load_planner(toy_model_dir, dtype="float32")
    load_checkpoint(ck2, twin_model, restore_rng_state=False)
    for (n, p), q in zip(resumed.model.named_parameters(), twin_model.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    base = base_weights(toy_model_dir)
    for n, p in resumed.trainer.ref_model.named_parameters():
        assert torch.equal(p.detach(), base[n]), f"reference {n} is not the base weight"
    resumed.run()
    rows = read_metrics(run / "metrics.jsonl")
    check_lines(rows, [1, 2, 3, 4])
    assert [c.step for c in list_checkpoints(run)][-1] == 4
    # a run that is already complete does nothing
    assert TrainLoop(dataclasses.replace(cfg, steps=4), resume=True).run() is None
    # without --resume the earlier run is cleared, and the header says so
    fresh = TrainLoop(cfg)
    assert fresh.start_step == 1 and any("starting over" in n for n in fresh.notes)
    assert not list_checkpoints(run) and not (run / "metrics.jsonl").read_bytes()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def test_a_killed_run_resumes_from_a_complete_checkpoint(tmp_path, toy_model_dir):
    run = tmp_path / "run"
    common = [
        "--preset",
        "toy",
        "--model",
        toy_model_dir,
        "--engine",
        "embedded",
        "--run-dir",
        str(run),
        "--queries-per-step",
        "3",
        "--group-size",
        "4",
    ]
    proc = subprocess.Popen(
        _cli(*common, "--steps", "200"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(run / "metrics.jsonl")) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run did not reach step 3 in 120 s"
            time.sleep(0.05)
        time.sleep(0.37)  # somewhere inside a later step (or its checkpoint)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = load_latest(run)
    assert ck is not None and ck.step >= 3
    from engine.model import load_planner

    load_checkpoint(ck, load_planner(toy_model_dir, dtype="float32"), restore_rng_state=False)
    # a step's checkpoint is written before its metrics line (which the checkpoint also holds)
    assert len(read_metrics(run / "metrics.jsonl")) in (ck.step - 1, ck.step)
    target = ck.step + 2
    out = subprocess.run(
        _cli(*common, "--steps", str(target), "--resume"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {ck.path}" in out.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, target + 1))
    assert load_latest(run).step == target


def test_the_tiny_preset_from_the_command_line(tmp_path):
    """What `make run` does (the default preset), for one step; the model is built into the run directory."""
    run = tmp_path / "tiny"
    out = subprocess.run(
        _cli("--steps", "1", "--run-dir", str(run), "--engine", "embedded"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "preset tiny" in out.stdout and "built the tiny model" in out.stdout and "resolved config" in out.stdout
    assert "success" in out.stdout and "done: 1 steps" in out.stdout
    rows = read_metrics(run / "metrics.jsonl")
    check_tiny = rows[0]
    assert check_tiny["rollout/num_trajectories"] == 8 and check_tiny["rollout/engine_calls"] >= 3
    assert all(k in check_tiny for k in STEP_KEYS) and check_tiny["timing_s/ref"] is not None  # kl_coef > 0


def test_real_shape_presets_on_the_meta_device_and_their_code_path(tmp_path):
    from engine.model import build_random_model, num_parameters, preset_config

    for name, count in (("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512)):
        cfg = preset(name)
        assert cfg.model.arch == name and cfg.model.path is None and cfg.model.dtype == "bfloat16"
        assert num_parameters(build_random_model(preset_config(name), device="meta")) == count
    # the same code path as the real preset (random weights on the device, tiny tokenizer, auto engine),
    # at a size a CPU runs in seconds: 1 layer, d=128, the real 151936-token vocabulary
    cfg = preset("qwen2.5-1.5b", run_dir=str(tmp_path / "q"))
    small = {
        "num_hidden_layers": 1,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, arch_overrides=small, dtype="float32"),
        task=dataclasses.replace(cfg.task, queries_per_step=1, group_size=2),
        agent=dataclasses.replace(
            cfg.agent,
            max_turns=1,
            planner_max_new_tokens=8,
            executor_max_new_tokens=8,
            verifier_max_new_tokens=2,
            generator_max_new_tokens=8,
        ),
        trainer=dataclasses.replace(cfg.trainer, micro_batch_tokens=2048, gradient_checkpointing=False),
        steps=1,
    )
    loop = TrainLoop(cfg)
    assert loop.engine_name == "embedded" and loop.model.config.vocab_size == 151936
    row = loop.run()
    assert row is not None and row["rollout/num_trajectories"] == 2 and row["actor/num_seqs"] >= 2


def test_bad_configurations_are_clear_errors(tmp_path):
    cfg = toy(run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, temperature=0.5))
    with pytest.raises(ValueError, match="top_p=1"):
        dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, top_p=0.9))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        dataclasses.replace(cfg.task, group_size=1)
    q = preset("qwen2.5-7b", run_dir=str(tmp_path / "q"))
    with pytest.raises(ValueError, match="needs a model directory"):
        TrainLoop(dataclasses.replace(q, rollout=dataclasses.replace(q.rollout, engine="vllm")))
    if not torch.cuda.is_available():  # 7.6B parameters: ~57 GiB with gradients and AdamW state
        with pytest.raises(ValueError, match="GiB for weights, gradients and AdamW"):
            TrainLoop(dataclasses.replace(q, model=dataclasses.replace(q.model, device="cpu")))
    with pytest.raises(UsageError, match="does not exist"):
        TrainLoop(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path / "nope"))))


def test_command_line_overrides():
    import argparse

    from engine.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args([]))
    assert cfg.preset == "tiny" and cfg.run_dir == "runs/tiny" and cfg.rollout.engine == "auto"
    args = p.parse_args(
        [
            "--preset",
            "toy",
            "--steps",
            "7",
            "--group-size",
            "6",
            "--queries-per-step",
            "5",
            "--lr",
            "0.01",
            "--micro-batch-tokens",
            "999",
            "--engine",
            "embedded",
            "--seed",
            "3",
            "--trace-step",
            "2",
            "--run-dir",
            "x",
            "--model",
            "m",
            "--kl-coef",
            "0.1",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.preset, cfg.steps, cfg.seed, cfg.trace_step, cfg.run_dir) == ("toy", 7, 3, 2, "x")
    assert (cfg.task.group_size, cfg.task.queries_per_step, cfg.model.path) == (6, 5, "m")
    assert (cfg.trainer.lr, cfg.trainer.micro_batch_tokens, cfg.trainer.kl_coef) == (0.01, 999, 0.1)
    assert cfg.rollout.engine == "embedded" and cfg.agent.planner_format == "tool_token"


def test_a_bad_data_file_fails_before_any_model_is_built(tmp_path):
    from engine.presets import with_overrides

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    cfg = with_overrides(preset("tiny", run_dir=str(tmp_path / "run")), data=str(bad))
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing field 'answer'"):
        TrainLoop(cfg)
    assert not (tmp_path / "run" / "model").exists()


def _toy_file(path: Path, seed: int, n: int) -> str:
    """`n` toy queries as a task file, the data source being the tool each needs, kinds interleaved."""
    from agentflow.tasks import load_task

    by_tool: dict[str, list] = {}
    for q in load_task("toy", 3 * n, seed=seed):
        by_tool.setdefault(q.meta["tool"], []).append(q)
    qs = [q for triple in zip(*(by_tool[t] for t in sorted(by_tool))) for q in triple][:n]  # one of each kind in turn
    rows = [
        {"id": q.id, "question": q.question, "answer": q.answer, "judge": q.judge, "source": q.meta["tool"]} for q in qs
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_file_sources_validation_and_the_best_checkpoint(tmp_path, toy_model_dir):
    import io

    from agentflow.tasks import load_queries
    from engine.eval import evaluate
    from engine.presets import with_overrides
    from engine.rollout.embedded import EmbeddedEngine

    train, val = _toy_file(tmp_path / "train.jsonl", 1, 9), _toy_file(tmp_path / "val.jsonl", 2, 6)
    cfg = small_toy(tmp_path / "run", toy_model_dir, "embedded", steps=3)
    cfg = with_overrides(cfg, data=train, val_data=(val,), val_every=2, val_before_train=True)
    out = io.StringIO()
    TrainLoop(cfg, out=out).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    check_lines(rows, [1, 2, 3])
    sources = ("calculator", "python", "search")
    for r in rows:  # the step's 3 queries are one of each kind, in file order
        assert sorted(k for k in r if k.startswith("reward/") and k.count("/") == 2) == [
            f"reward/{s}/mean" for s in sources
        ]
        assert r["reward/mean"] == pytest.approx(sum(r[f"reward/{s}/mean"] for s in sources) / 3)
    assert "val/accuracy" not in rows[0] and rows[0]["timing_s/validate"] is None
    vals = read_metrics(tmp_path / "run" / "validation.jsonl")
    assert [v["step"] for v in vals] == [0, 2, 3]
    for r, v in zip(rows[1:], vals[1:]):
        assert r["timing_s/validate"] > 0 and r["val/num_queries"] == 6
        assert {k: r[k] for k in v if k != "step"} == {k: v[k] for k in v if k != "step"}
        assert r["val/accuracy"] == pytest.approx(sum(2 * r[f"val/{s}/accuracy"] for s in sources) / 6)
    text = out.getvalue()
    assert "validation before step 1: accuracy" in text and "val_acc" in text
    # the best checkpoint: the first step with the highest accuracy; it holds the weights validated then
    best_step = max((v for v in vals[1:]), key=lambda v: v["val/accuracy"])["step"]
    best = list_checkpoints(tmp_path / "run" / "best")
    assert [c.step for c in best] == [best_step] and best[0].state["val/accuracy"] == vals[[0, 2, 3].index(best_step)][
        "val/accuracy"
    ]
    engine = EmbeddedEngine.from_pretrained(toy_model_dir, dtype="float32", device="cpu")
    load_checkpoint(best[0], engine.model, None)
    queries = load_queries(val)
    by_source = {s: [q for q in queries if q.source == s] for s in sources}
    agent = dataclasses.replace(cfg.agent, temperature=0.0)
    rows_again, _ = evaluate(engine, by_source, agent)
    assert [r.accuracy for r in rows_again[:3]] == [best[0].state["validation"][f"val/{s}/accuracy"] for s in sources]


def test_data_and_validation_flags():
    import argparse

    from engine.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = ["--data", "t.parquet", "--question-key", "problem", "--answer-key", "reward_model.ground_truth"]
    flags += ["--source-key", "data_source", "--answer-sep", "; ", "--val-data", "a.json", "b", "--val-every", "5"]
    t = config_from_args(p.parse_args([*flags, "--val-before-train"])).task
    assert (t.data, t.question_key, t.answer_key, t.source_key) == (
        "t.parquet",
        "problem",
        "reward_model.ground_truth",
        "data_source",
    )
    assert (t.answer_sep, t.val_data, t.val_every, t.val_before_train) == ("; ", ("a.json", "b"), 5, True)
    assert t.spec().answer_sep == "; "
    d = config_from_args(p.parse_args([])).task
    assert (d.val_data, d.val_every, d.val_before_train) == ((), 0, False)
    with pytest.raises(ValueError, match="need validation data"):
        config_from_args(p.parse_args(["--val-every", "2"]))
