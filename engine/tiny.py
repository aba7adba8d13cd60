"""`flowgrpo make-tiny`: a locally built tokenizer and a randomly initialised Qwen2 causal LM.

No network: the tokenizer is a byte-level BPE trained on `engine/assets/tokenizer_corpus.txt`
(shipped in the repository) with the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`
and a ChatML chat template; the model is `Qwen2ForCausalLM` with random weights, saved as an HF
directory with safetensors. It loads with `transformers.AutoModelForCausalLM.from_pretrained` and
with `vllm.LLM(model=DIR)`. head_dim is at least 64 because vLLM's CPU attention rejects 16.

Nothing is overwritten by accident: a path that is a file and a non-empty directory are refused
(`--force` replaces the directory's contents). The model is built in a hidden sibling directory
and renamed into place, so an interrupted build never leaves a half-written model under the name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.preflight import UsageError

CORPUS = Path(__file__).parent / "assets" / "tokenizer_corpus.txt"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TinyConfig:
    """Size of the tiny model. head_dim = hidden / heads must be >= 64 (vLLM CPU attention)."""

    vocab_size: int = 2000
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 352
    max_position: int = 4096
    tie_embeddings: bool = True
    dtype: str = "float32"
    seed: int = 0
    extra_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.hidden // self.heads < 64:
            raise ValueError(
                f"head_dim = hidden / heads = {self.hidden // self.heads} < 64: vLLM's CPU attention rejects it; "
                f"raise --hidden or lower --heads"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")

    def hf_fields(self, tok: Any) -> dict[str, Any]:
        """The HF config fields of this size with the tokenizer `tok` (`build_tokenizer`), the same for the
        tiny Qwen2 (`make_tiny`) and the tiny Llama (`engine.make_model`); each adds its own RoPE and tying."""
        return dict(
            vocab_size=len(tok),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=self.max_position,
            bos_token_id=None,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        )


def build_tokenizer(vocab_size: int, extra_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE on the shipped corpus; returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_target(out_dir: str | Path, *, force: bool = False) -> Path:
    """`out_dir` as a Path if make-tiny may write there: missing, empty, or (force) a directory."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; pass a directory to build the tiny model into")
    if out.is_dir() and not force:
        found = sorted(p.name for p in out.iterdir())
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise UsageError(
                f"{out} is not empty ({shown}); pass --force to replace its contents, or choose a new directory"
            )
    return out


def make_tiny(out_dir: str | Path, cfg: TinyConfig = TinyConfig(), *, force: bool = False) -> Path:
    """Build tokenizer + random Qwen2 model into `out_dir` (missing or empty; `force`: replace what is there)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    final = check_target(out_dir, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    out.mkdir()
    tok = build_tokenizer(cfg.vocab_size, cfg.extra_tokens)
    hf = cfg.hf_fields(tok)
    config = Qwen2Config(**hf, tie_word_embeddings=cfg.tie_embeddings, rope_theta=10000.0)
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config).to(DTYPES[cfg.dtype])
    model.generation_config = GenerationConfig(eos_token_id=hf["eos_token_id"], pad_token_id=hf["pad_token_id"])
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "flowgrpo_tiny.json").write_text(
        json.dumps({**asdict(cfg), "actual_vocab_size": hf["vocab_size"]}, indent=2) + "\n"
    )
    for p in out.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # empty, or --force: the old contents go only once the new model is complete
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        os.rename(out, final)
        shutil.rmtree(trash)
    else:
        os.rename(out, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def ensure_tiny(out_dir: str | Path, cfg: TinyConfig = TinyConfig()) -> tuple[Path, bool]:
    """The tiny model of `cfg` in `out_dir`: reused when one built with the same settings is there,
    built when the directory holds no model; (path, built now). Other settings are an error."""
    out = Path(out_dir)
    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        return make_tiny(out, cfg), True
    stamp = out / "flowgrpo_tiny.json"
    built = json.loads(stamp.read_text()) if stamp.exists() else {}
    want = asdict(cfg)
    if built and any(built.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in want.items()):
        raise ValueError(
            f"{out} holds a tiny model built with other settings than this preset's ({cfg}); "
            f"use another --run-dir or delete {out}"
        )
    return out, False


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TinyConfig()
    p.add_argument("out_dir", help="directory to write the HF model and tokenizer into")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size target")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-tie", action="store_true", help="separate LM head instead of tied embeddings")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty output directory")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = TinyConfig(
            vocab_size=args.vocab_size,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            dtype=args.dtype,
            seed=args.seed,
            tie_embeddings=not args.no_tie,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = make_tiny(args.out_dir, cfg, force=args.force)
    meta = json.loads((out / "flowgrpo_tiny.json").read_text())
    with safe_open(out / "model.safetensors", framework="pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    print(
        f"wrote {out}: Qwen2 {cfg.layers}L d={cfg.hidden} heads={cfg.heads}/{cfg.kv_heads} vocab={meta['actual_vocab_size']} "
        f"{n_params / 1e6:.2f}M params {cfg.dtype}"
    )
    return 0
