"""`flowgrpo bench memory`: the computed per-rank memory rests on exact parameter and KV-cache counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.memory import GiB, Layout, Shape, load_shape, rank_memory
from engine.model import MODEL_SHAPES
from engine.rollout.vllm_engine import kv_bytes_per_token

LLAMA_SMALL = dict(  # SmolLM2-135M's shape: tied embeddings, 9 query / 3 KV heads, no biases
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def _hf_params(cfg: dict) -> int:
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    config = AutoConfig.for_model(cfg["model_type"], **fields)
    with torch.device("meta"):  # no memory: 7B parameters as shapes only
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter


@pytest.mark.parametrize("name", [*MODEL_SHAPES, "smollm2-135m"])
def test_parameter_count_matches_transformers(name):
    cfg = LLAMA_SMALL if name == "smollm2-135m" else MODEL_SHAPES[name]
    assert Shape.from_config(cfg).params == _hf_params(cfg)


def test_qwen7b_figures():
    shape = Shape.from_config(MODEL_SHAPES["qwen2.5-7b"])
    assert shape.params == 7_615_616_512  # Qwen2.5-7B's published count is 7.61 B
    plan = rank_memory(shape, Layout(nnodes=1, nproc_per_node=8, queries=32, group_size=8, max_model_len=4096))
    assert plan["train"]["weights shard"] == -(-shape.params // 8) * 2
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
    assert payload["params"] == Shape.from_config(MODEL_SHAPES["qwen2.5-1.5b"]).params
    assert "2×8 HSDP" in table[1] and "headroom on H200 141GB" in out
    peak = max(sum(payload["layouts"][0]["bytes"][p].values()) for p in ("train", "rollout")) / GiB
    assert f"{peak:.2f}" in next(line for line in table if line.startswith("peak"))
    bad = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "memory", "--tp", "3"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
