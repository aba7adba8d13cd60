"""The Llama architecture (SmolLM2's layout) on every path: packed attention, the fused LM-head loss with
tied embeddings, vLLM-CPU and embedded rollout, weight sync, checkpoints and resume, check-sync, and the
one-line error for an architecture that is not supported.

All on a locally built random Llama (`engine.make_model.make_tiny_llama`: 2 layers, d=128, 2 query /
1 KV heads, head_dim 64, tied embeddings), float32 on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import kernels
from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.logprob_gap import logprob_gap
from engine.make_model import make_tiny_llama
from engine.model import hidden_states, lm_head_weight, load_planner
from engine.packing import TrainSequence, pack
from engine.preflight import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, check_model_dir
from engine.presets import TOY_TOOLS, toy
from engine.rollout.protocol import SamplingConfig
from engine.tiny import TinyConfig
from kernels.testing import assert_close

# Same weights on both sides, float32 on CPU: measured gap_max ~5e-7 on the tiny Llama.
SAME_WEIGHTS_GAP = 1e-4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("llama") / "model"
    make_tiny_llama(out, TinyConfig(extra_tokens=TOY_TOOLS))
    return str(out)


def _chat(tok, texts):
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for t in texts
    ]


def test_tiny_llama_has_smollm2s_layout(llama_dir):
    from safetensors import safe_open

    config = json.loads((Path(llama_dir) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 64
    assert config["num_attention_heads"] > config["num_key_value_heads"]
    with safe_open(Path(llama_dir) / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    model = load_planner(llama_dir, dtype="float32")
    assert lm_head_weight(model) is model.get_input_embeddings().weight


def test_packed_forward_and_tied_head_gradients_match_the_stock_model(llama_dir):
    """Packed hidden states + the fused LM-head log-probs against the stock model's own (tied) head in
    float64, one sequence at a time: log-probs and the gradient of every parameter, the tied embedding
    collecting both its input and its output gradient."""
    model = load_planner(llama_dir, dtype="float32")
    gold = copy.deepcopy(model).double()
    gold.set_attn_implementation("sdpa")
    rng = random.Random(3)
    vocab = model.config.vocab_size
    seqs = [
        TrainSequence(
            [rng.randrange(vocab) for _ in range(p)], [rng.randrange(vocab) for _ in range(r)], [0.0] * r, 1.0
        )
        for p, r in [(1, 1), (9, 4), (31, 17), (3, 2)]
    ]
    (mb,) = pack(seqs, 10_000)
    rows = hidden_states(model, mb).index_select(0, mb.loss_positions)
    lp = kernels.linear_token_logprobs(rows, lm_head_weight(model), mb.targets)
    lp.sum().backward()

    gold_lp = []
    for s in seqs:
        logits = gold(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
        p = len(s.prompt_ids)
        logp = torch.log_softmax(logits[p - 1 : p - 1 + len(s.response_ids)], dim=-1)
        gold_lp.append(logp.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0])
    order = torch.cat([gold_lp[i] for i in mb.seq_indices])
    order.sum().backward()
    # float32 against float64: observed max |diff| ~2e-6 on the log-probs.
    assert_close(lp, order.detach(), dtype=torch.float32, name="log-probs")
    got = dict(model.named_parameters())
    for name, p in gold.named_parameters():
        scale = p.grad.abs().max().item()
        assert_close(got[name].grad, p.grad, dtype=torch.float32, name=name, scale=scale)


def _perturb_(params, names, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in params:
            if n in names:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())


def test_vllm_engine_on_tied_llama_follows_the_embedding(llama_dir):
    """vLLM's tied LM head is the embedding: changing only the embedding in the trainer and syncing must
    move vLLM's logits (a stale CPU GEMM handle of the head would keep the old ones)."""
    pytest.importorskip("vllm")
    from engine.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine.from_pretrained(llama_dir, dtype="float32", max_model_len=512, kv_cache_bytes=16 << 20)
    model = load_planner(llama_dir, dtype="float32").eval()
    prompts = _chat(engine.tokenizer, [f"What is {i} + {2 * i + 1}?" for i in range(4)])
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=5)

    def gap():
        return logprob_gap(engine.generate(prompts, sampling), model=model, sampling=sampling)

    assert gap()["gap_max"] < SAME_WEIGHTS_GAP
    _perturb_(model.named_parameters(), {"model.embed_tokens.weight"})
    before = gap()
    assert before["gap_max"] > 1e-2, "the embedding change must move the trainer's log-probs"
    report = engine.sync_weights(model.named_parameters())
    assert report.complete and report.num_tensors == report.num_expected
    assert "lm_head.weight" not in report.extra["skipped"]  # HF's named_parameters() lists the tied head once
    assert "lm_head" in report.extra["cpu_gemm_refreshed"]
    assert gap()["gap_max"] < SAME_WEIGHTS_GAP
    # the checkpoint-free path: a state dict that does name lm_head.weight is accepted (skipped as tied)
    report = engine.sync_weights(model.state_dict().items())
    assert report.complete and report.extra["skipped"] == ["lm_head.weight"]
    engine.shutdown()


def test_embedded_engine_on_tied_llama(llama_dir):
    from engine.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine.from_pretrained(llama_dir, dtype="float32")
    prompts = _chat(engine.tokenizer, ["Name a prime.", "What is 2 + 2?", "Hi"])
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=1)
    gens = engine.generate(prompts, sampling)
    assert all(len(g.token_ids) >= 1 for g in gens)
    assert logprob_gap(gens, model=engine.model, sampling=sampling)["gap_max"] < SAME_WEIGHTS_GAP
    report = engine.sync_weights(engine.model.named_parameters())
    assert report.zero_copy and report.complete


def test_train_sync_checkpoint_and_resume_on_tiny_llama(tmp_path, llama_dir):
    """Two toy steps on vLLM (weights change, the engine follows each sync), the checkpoint stores the tied
    weight once, and a resumed run (embedded engine) continues from it with the tie intact."""
    pytest.importorskip("vllm")
    from engine.loop import TrainLoop
    from engine.metrics import read_metrics

    run = tmp_path / "run"
    cfg = toy(run_dir=str(run))
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=llama_dir),
        rollout=dataclasses.replace(cfg.rollout, engine="vllm", kv_cache_bytes=16 << 20),
        task=dataclasses.replace(cfg.task, queries_per_step=3, group_size=4),
        trainer=dataclasses.replace(cfg.trainer, lr=1e-2),
        steps=2,
        seed=1,
        gap_probe_every=1,  # probe both steps
    )
    loop = TrainLoop(cfg)
    loop.run()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sync/complete"] == 1.0
        assert r["sync/gap_stale_max"] > 1e-3 and r["sync/gap_after_max"] < SAME_WEIGHTS_GAP
        assert r["training/rollout_logprob_diff_max"] < SAME_WEIGHTS_GAP
    trained = {n: p.detach().clone() for n, p in loop.model.named_parameters()}
    loop.engine.shutdown()
    del loop

    from safetensors import safe_open

    ck = list_checkpoints(run)[-1]
    with safe_open(ck.path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert json.loads(f.metadata()["flowgrpo_aliases"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    fresh = load_planner(llama_dir, dtype="float32")
    load_checkpoint(ck, fresh, restore_rng_state=False)
    assert lm_head_weight(fresh) is fresh.get_input_embeddings().weight
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())

    resumed = TrainLoop(
        dataclasses.replace(cfg, steps=3, rollout=dataclasses.replace(cfg.rollout, engine="embedded")), resume=True
    )
    assert resumed.start_step == 3
    assert lm_head_weight(resumed.model) is resumed.model.get_input_embeddings().weight
    resumed.run()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("backend", ["embedded", "vllm"])
def test_check_sync_cli_on_tiny_llama(llama_dir, tmp_path, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    from engine.cli import main

    out = tmp_path / "sync.json"
    argv = ["check-sync", "--model", llama_dir, "--backend", backend, "--prompts", "3", "--max-new-tokens", "8"]
    assert main([*argv, "--kv-cache-bytes", str(16 << 20), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["passed"] and r["sync"]["complete"]
    assert r["gap_initial"]["gap_max"] < SAME_WEIGHTS_GAP


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=1, vocab_size=300)).save_pretrained(out)
    return str(out)


def test_unsupported_architecture_is_one_line_naming_the_supported(gpt2_dir, tmp_path, capsys):
    with pytest.raises(UnsupportedArchitecture) as e:
        check_model_dir(gpt2_dir)
    msg = str(e.value)
    assert "\n" not in msg and "'gpt2'" in msg and all(k in msg for k in SUPPORTED_ARCHITECTURES)
    with pytest.raises(UnsupportedArchitecture):
        load_planner(gpt2_dir)
    from engine.rollout.embedded import EmbeddedEngine

    with pytest.raises(UnsupportedArchitecture):
        EmbeddedEngine.from_pretrained(gpt2_dir)
    if importlib.util.find_spec("vllm") is not None:
        from engine.rollout.vllm_engine import VLLMEngine

        with pytest.raises(UnsupportedArchitecture):
            VLLMEngine.from_pretrained(gpt2_dir)
    from engine.cli import main

    capsys.readouterr()
    assert main(["check-sync", "--model", gpt2_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not supported" in err
    assert main(["train", "--model", gpt2_dir, "--run-dir", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not supported" in err and "llama" in err
