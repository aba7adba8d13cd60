"""`engine.memory_model` and `flowgrpo bench memory`: the computed memory rests on exact parameter and KV-cache
counts, and the one-process preflight (`engine.build.recipe_bytes`) is the same model at world 1."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from engine.memory_model import GiB, Layout, load_shape, one_process_state, rank_memory
from engine.model import MODEL_SHAPES
from engine.rollout.vllm_engine import kv_bytes_per_token


def test_counts_split_into_layers_and_root():
    q7 = load_shape("qwen2.5-7b")[1]
    assert q7.params == 7_615_616_512  # Qwen2.5-7B's published count, 7.61 B
    assert q7.root_params == 2 * 152064 * 3584 + 3584  # untied embedding and LM head, final norm
    # one layer: q/o 3584², k/v 3584·512 with q/k/v biases, gate/up/down 3·3584·18944, two norms
    assert q7.layer_params == 2 * 3584**2 + 2 * 3584 * 512 + (3584 + 2 * 512) + 3 * 3584 * 18944 + 2 * 3584
    q15 = load_shape("qwen2.5-1.5b")[1]
    assert q15.root_params == 151936 * 1536 + 1536  # tied: the embedding is the LM head


def test_qwen7b_figures():
    shape = load_shape("qwen2.5-7b")[1]
    plan = rank_memory(shape, Layout(nnodes=1, nproc_per_node=8, queries=32, group_size=8, max_model_len=4096))
    assert plan["train"]["weights shard"] == plan["train"]["reference shard"] == -(-shape.params // 8) * 2
    assert rank_memory(shape, Layout(reference=False))["train"]["reference shard"] == 0
    assert plan["rollout"]["vLLM weights"] == shape.params * 2
    # 32·8 trajectories over 8 rollout groups, 4096 tokens, 2·28·4·128·2 B per token
    assert plan["rollout"]["vLLM KV cache"] == 32 * 4096 * 57344
    two_nodes = rank_memory(shape, Layout(nnodes=2, nproc_per_node=8))
    assert two_nodes["train"] == plan["train"]  # HSDP shards within a node: the same shard per rank
    assert two_nodes["rollout"]["vLLM KV cache"] * 2 == plan["rollout"]["vLLM KV cache"]
    fsdp16 = rank_memory(shape, Layout(nnodes=2, nproc_per_node=8, hsdp=False))
    assert fsdp16["train"]["weights shard"] < plan["train"]["weights shard"]
    tp2 = rank_memory(shape, Layout(tp=2))
    assert tp2["rollout"]["vLLM weights"] * 2 == plan["rollout"]["vLLM weights"]


def test_kv_per_token_agrees_with_the_engine(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**MODEL_SHAPES["qwen2.5-1.5b"], "torch_dtype": "bfloat16"}))
    _, shape = load_shape(str(tmp_path))
    plan = rank_memory(shape, Layout(nproc_per_node=1, queries=1, group_size=1, max_model_len=1))
    assert plan["rollout"]["vLLM KV cache"] == kv_bytes_per_token(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(tp=3), "tp=3 must divide"), (dict(queries=4, nproc_per_node=8), "divisible by the 8 rollout groups")],
)
def test_bad_layout_is_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Layout(**kwargs)


def test_cli_prints_table_and_json():
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "memory", "--model", "qwen2.5-1.5b", "--nnodes", "2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    *table, last = out.strip().splitlines()
    payload = json.loads(last)
    assert payload["params"] == load_shape("qwen2.5-1.5b")[1].params
    assert "2×8 HSDP" in table[1] and "headroom on H200 141GB" in out
    peak = max(sum(payload["layouts"][0]["bytes"][p].values()) for p in ("train", "rollout")) / GiB
    assert f"{peak:.2f}" in next(line for line in table if line.startswith("peak"))
    bad = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "memory", "--tp", "3"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_one_process_gathers_nothing_and_its_state_is_weights_grads_moments():
    shape = load_shape("qwen2.5-1.5b")[1]
    plan = rank_memory(shape, Layout(nproc_per_node=1, reference=False, vllm_helper=True))
    assert plan["train"]["gathered root + 2 layers"] == plan["train"]["unsharded gradients (root + 1 layer)"] == 0
    assert plan["rollout"]["weight sync (largest group gathered)"] == 0  # no FSDP at world 1: nothing to gather
    w = shape.params * 2
    state = one_process_state(shape, reference=False, vllm_helper=True)
    assert state == {"train": 4 * w, "rollout": 3 * w, "host": 2 * w}  # no activations, loss or KV cache
    assert one_process_state(shape, vllm=False)["rollout"] == 2 * w  # the embedded engine shares the weights


def test_recipe_bytes_is_the_one_process_model(tmp_path):
    from engine.build import choose_engine, recipe_bytes
    from engine.presets import preset

    cfg = preset("agentflow", run_dir=str(tmp_path / "af"))
    (tmp_path / "config.json").write_text(json.dumps(MODEL_SHAPES["qwen2.5-1.5b"]))
    shape = load_shape(str(tmp_path))[1]
    need = recipe_bytes(cfg, tmp_path)
    w = shape.params * 2
    # auto picks vLLM for a model directory where vLLM is installed: its copy of the weights is counted
    engine_copy = w if choose_engine(cfg.rollout.engine, tmp_path)[0] == "vllm" else 0
    assert (need["params"], need["train"], need["rollout"]) == (shape.params, 5 * w, 3 * w + engine_copy)
    embedded = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="embedded"))
    assert recipe_bytes(embedded, tmp_path)["rollout"] == 3 * w


def test_importing_the_model_loads_no_framework():
    code = "import sys, engine.memory_model; print(sorted({'torch', 'transformers', 'vllm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_random_weights_check_counts_weights_grads_and_moments():
    import torch

    from engine.build import check_fits, device_free_bytes
    from engine.model import preset_config

    cpu = torch.device("cpu")
    if device_free_bytes(cpu) < 4 * 2 * 7_615_616_512:  # e.g. a 24 GiB CPU machine
        with pytest.raises(ValueError, match=r"^7.62B parameters in bfloat16 need about 56.7 GiB for weights, grad"):
            check_fits(preset_config("qwen2.5-7b"), "bfloat16", cpu)
    else:
        check_fits(preset_config("qwen2.5-7b"), "bfloat16", cpu)
