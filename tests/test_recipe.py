"""AgentFlow's training recipe: turn/trajectory advantage grouping, groups of one, mini-batches with the old
log-prob pass only when needed, the `agentflow` preset and its refusal, the command-line flags."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math

import pytest
import torch
from test_trainer import make_sequences, small_model

from engine.advantage import AdvantageConfig, group_advantages
from engine.presets import preset
from engine.timer import PhaseTimer
from engine.trainer import Trainer, TrainerConfig


def test_turn_grouping_weighs_longer_trajectories_as_agentflows_code():
    # rewards {1 with 1 turn, 0 with 3 turns}: samples over turns are [1, 0, 0, 0], mean 1/4, unbiased std 1/2
    adv, _ = group_advantages([1.0, 0.0], [0, 0], turns=[1, 3])
    assert adv.tolist() == pytest.approx([1.5, -0.5], abs=1e-5)
    adv, _ = group_advantages([1.0, 0.0], [0, 0])  # per trajectory: mean 1/2, std 1/sqrt(2)
    assert adv.tolist() == pytest.approx([math.sqrt(0.5), -math.sqrt(0.5)], abs=1e-5)
    # two groups, one with a trajectory that never reached the planner (0 turns: not a sample)
    adv, stats = group_advantages([1.0, 0.0, 1.0, 1.0, 0.0], ["a", "a", "b", "b", "b"], turns=[2, 2, 1, 0, 1])
    assert adv[:2].tolist() == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2], abs=1e-5)
    assert adv[2].item() == pytest.approx(math.sqrt(0.5), abs=1e-5) and adv[4].item() == pytest.approx(
        -math.sqrt(0.5), abs=1e-5
    )
    assert stats.num_groups == 2 and stats.num_zero_var_groups == 0
    with pytest.raises(ValueError, match="turns must give a count >= 0 for each of the 2 trajectories"):
        group_advantages([1.0, 0.0], [0, 0], turns=[1])
    with pytest.raises(ValueError, match="grouping must be one of"):
        AdvantageConfig(grouping="step")


def test_a_group_of_one_sample_has_no_baseline():
    # one trajectory (or, grouped by turn, one turn in all): A = 0, counted; verl would give A = R here
    adv, stats = group_advantages([1.0, 0.5, 0.0], ["a", "b", "b"])
    assert adv[0].item() == 0.0 and stats.num_singleton_groups == 1
    adv, stats = group_advantages([1.0, 0.0], [0, 0], turns=[1, 0])
    assert adv.tolist() == [0.0, 0.0] and stats.num_singleton_groups == 1
    adv, stats = group_advantages([1.0, 1.0], [0, 0], turns=[3, 1])  # equal rewards: zero variance, not NaN
    assert adv.tolist() == [0.0, 0.0] and stats.num_zero_var_groups == 1


def _update(model, seqs, **cfg):
    trainer = Trainer(model, TrainerConfig(loss_impl="reference", kl_coef=0.0, lr=1e-2, micro_batch_tokens=64, **cfg))
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("step"):
        metrics = trainer.update(seqs, timer=timer)
    return trainer, metrics, timer.collect().phases


def test_one_optimizer_step_needs_no_old_log_prob_pass():
    seqs = make_sequences(6, seed=21)
    base = small_model(seed=20)
    trainer, m, phases = _update(copy.deepcopy(base), seqs)
    assert "old_log_prob" not in phases and m["actor/optimizer_steps"] == 1.0
    assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["actor/pg_clipfrac"] == 0.0
    assert m["perf/logprob_flops"] == 0.0 and m["actor/num_micro_batches"] > 1
    # the same step with the old log-probs recomputed in their own pass: the same new weights
    explicit = Trainer(copy.deepcopy(base), trainer.config)
    batch = explicit.prepare(seqs)
    explicit.compute_old_logprobs(batch)
    ref_metrics = explicit.train(batch)
    for (name, p), q in zip(trainer.model.named_parameters(), explicit.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)  # float32: observed 0 difference
    assert ref_metrics["actor/pg_loss"] == pytest.approx(m["actor/pg_loss"], abs=1e-6)
    assert batch.metrics["training/rollout_logprob_diff_max"] == pytest.approx(
        m["training/rollout_logprob_diff_max"], abs=1e-6
    )


def test_mini_batches_are_optimizer_steps_after_one_old_pass():
    seqs = make_sequences(6, seed=23)
    _, m, phases = _update(small_model(seed=22), seqs, mini_batches=3)
    assert "old_log_prob" in phases and m["actor/optimizer_steps"] == 3.0 and m["actor/num_mini_batches"] == 3.0
    assert m["actor/ratio_max"] > 1.0 + 1e-4  # later mini-batches see a moved policy
    _, m, phases = _update(small_model(seed=22), seqs, ppo_epochs=2)
    assert "old_log_prob" in phases and m["actor/optimizer_steps"] == 2.0


def test_the_agentflow_preset_holds_agentflows_settings_and_refuses_small_devices(tmp_path):
    from engine.build import check_recipe_fits, device_free_bytes, recipe_bytes

    cfg = preset("agentflow", run_dir=str(tmp_path / "af"))
    t, a = cfg.trainer, cfg.agent
    assert (cfg.task.queries_per_step, cfg.task.group_size, a.max_turns, a.planner_max_new_tokens) == (32, 8, 3, 2048)
    assert (t.lr, t.kl_type, t.kl_coef, t.clip_low, t.clip_high, t.clip_ratio_c) == (1e-6, "k3", 0.001, 0.2, 0.3, 3.0)
    assert (t.loss_agg, t.weight_decay, t.mini_batches, t.temperature, a.temperature) == (
        "token-mean",
        0.01,
        4,
        0.7,
        0.7,
    )
    assert (cfg.helper.kind, a.judge, a.planner_format, cfg.advantage.grouping) == ("vllm", "llm", "agentflow", "turn")
    need = recipe_bytes(cfg, None)
    assert need["params"] == 7_615_616_512 and need["train"] == 5 * 2 * need["params"]
    cpu = torch.device("cpu")
    if device_free_bytes(cpu) < need["train"]:  # e.g. a 24 GiB CPU machine
        with pytest.raises(
            ValueError,
            match=r"preset agentflow: 7.62B parameters in bfloat16 need about 70.9 GiB to "
            r"train .* and 42.6 GiB in the rollout .* but cpu has \d+.\d GiB free",
        ):
            check_recipe_fits(cfg, None, cpu)
    else:
        check_recipe_fits(cfg, None, cpu)


def test_recipe_flags_reach_the_configuration():
    from engine.train import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = ["--preset", "tiny", "--helper", "http", "--helper-url", "http://127.0.0.1:8000/v1"]
    args += ["--helper-model", "qwen", "--helper-api-key-env", "KEY", "--judge", "llm", "--planner-format", "agentflow"]
    args += ["--advantage", "turn", "--mini-batches", "4", "--weight-decay", "0.01"]
    args += ["--planner-max-new-tokens", "2048", "--context-budget", "4096"]
    cfg = config_from_args(p.parse_args(args))
    assert dataclasses.astuple(cfg.helper)[:5] == ("http", None, "http://127.0.0.1:8000/v1", "qwen", "KEY")
    assert (cfg.agent.judge, cfg.agent.planner_format, cfg.advantage.grouping) == ("llm", "agentflow", "turn")
    assert (cfg.trainer.mini_batches, cfg.trainer.weight_decay) == (4, 0.01)
    assert (cfg.agent.planner_max_new_tokens, cfg.agent.context_budget) == (2048, 4096)
    cfg = config_from_args(p.parse_args(["--preset", "tiny", "--helper", "reference"]))
    assert cfg.helper.kind == "reference" and cfg.trainer.kl_coef > 0
    with pytest.raises(ValueError, match="exists only when kl_coef > 0"):
        config_from_args(p.parse_args(["--preset", "toy", "--helper", "reference"]))
