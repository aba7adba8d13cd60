"""Checks before work: every input of a run is validated before a model or an engine is built.

`check_run(config)` is called first thing by `flowgrpo train` (and `check_model_dir` / `check_device`
by `flowgrpo solve` and `flowgrpo eval`; `check_model_dir` again by every model load:
`engine.model.load_planner` and the embedded and vLLM engines' `from_pretrained`); each problem raises
`UsageError` with one line naming the problem and the fix, which the command line (`engine.cli`) prints
as `flowgrpo: error: <line>` with exit status 2.
Nothing here writes or deletes anything; `check_resume` runs under the run-directory lock
(`engine.run_dir`) because it reads checkpoints another process could be writing.

What is checked, and how (cheaply: no weights are read):
- `--run-dir` is a directory or does not exist yet.
- `--data`: exists, parses line by line (`agentflow.tasks.load_jsonl`, which names `path:line`), holds
  at least one query.
- `--model`: a directory with a `config.json` that parses, whose `model_type` the trainer supports
  (`SUPPORTED_ARCHITECTURES`: the packed forward passes prepared masks and `cu_seqlens` through the
  decoder, which only these implementations accept), and safetensors files whose headers parse and
  whose recorded tensor extents end exactly at the end of the file (a truncated file fails here);
  a sharded index must name only shards that exist. The tiny model a run builds into its own
  directory is checked the same way when it is already there.
- `--device`: a CUDA device must exist (`torch.cuda.is_available()` and the index in range).
- `--micro-batch-tokens`: at least the longest planner turn. The rollout only asks the planner when
  prompt + planner_max_new_tokens <= context_budget, so a turn (prompt + response) has at most
  `context_budget` tokens, and the packer cannot split a sequence across micro-batches.
- `--resume`: with an earlier run in the directory (metrics lines or `step_*` directories) but no
  checkpoint that verifies, refuse (`--restart` moves the earlier run aside instead).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# model_type -> architecture class: what packed attention, the fused loss, rollout and sync are tested on
SUPPORTED_ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class UsageError(ValueError):
    """Bad input, found before any work: one line naming the problem and the fix (exit status 2)."""


def check_run_dir(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--run-dir {p} is a file; pass a directory (it is created if missing)")
    return p


def check_data(path: str | Path) -> int:
    """Number of queries in the JSONL file; UsageError when missing, invalid (path:line) or empty."""
    from agentflow.tasks import load_jsonl

    try:
        queries = load_jsonl(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--data: {e}") from None
    if not queries:
        raise UsageError(f'--data {path} holds no queries; add one {{"question", "answer"}} object per line')
    return len(queries)


def check_safetensors(path: str | Path) -> None:
    """The file's header parses and its tensors' extents end exactly at the end of the file."""
    p = Path(path)
    size = p.stat().st_size
    fix = "rebuild or re-download the model"
    if size < 8:
        raise UsageError(f"{p} is truncated ({size} bytes, not even a safetensors header); {fix}")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(_MAX_HEADER, size - 8):
            raise UsageError(f"{p}: damaged safetensors header (length {n} for a {size}-byte file); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError):
        raise UsageError(f"{p}: damaged safetensors header (not the JSON safetensors writes); {fix}") from None
    data = size - 8 - n
    if max(ends, default=0) != data:
        what = "truncated" if max(ends, default=0) > data else "longer than its header says"
        raise UsageError(
            f"{p} is {what}: its header describes {max(ends, default=0)} bytes of tensors, the file holds {data}; {fix}"
        )


def _config(p: Path) -> dict[str, Any]:
    cfg_path = p / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{cfg_path} is not UTF-8 text; restore the model's config.json") from None
    except json.JSONDecodeError as e:
        raise UsageError(
            f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); restore the model's config.json"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read {cfg_path} ({e.strerror}); pass a Hugging Face model directory") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not the object a model config is")
    return cfg


class UnsupportedArchitecture(UsageError):
    """A model whose `model_type` the packed attention, fused loss, rollout and sync paths are not tested on."""


def check_architecture(path: str | Path) -> str:
    """The `model_type` of the model directory's config.json if the trainer supports it, else UsageError."""
    cfg = _config(Path(path))
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_ARCHITECTURES.items())
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures field"
        raise UnsupportedArchitecture(
            f"{Path(path) / 'config.json'}: model_type {model_type!r} ({arch}) is not supported by the trainer; supported: {supported}"
        )
    return model_type


def check_model_dir(path: str | Path) -> Path:
    """A local HF model directory that the trainer and the rollout engines can load (see the module doc),
    else UsageError."""
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"model directory {p} does not exist; pass a local Hugging Face model directory "
            f"(build SmolLM2 with `make model` or `flowgrpo make-model smollm2-135m-instruct {p}`, "
            f"or a tiny one with `flowgrpo make-tiny {p}`)"
        )
    if not p.is_dir():
        raise UsageError(f"model path {p} is a file; pass the directory holding config.json and *.safetensors")
    if not (p / "config.json").is_file():
        raise UsageError(f"model directory {p} has no config.json; it is not a Hugging Face model directory")
    check_architecture(p)
    shards = sorted(p.glob("*.safetensors"))
    if not shards:
        raise UsageError(
            f"model directory {p} has no *.safetensors weights; save the model with "
            f"`save_pretrained(..., safe_serialization=True)`"
        )
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{index} is damaged (no weight_map); restore it or re-save the model") from None
        missing = sorted(named - {s.name for s in shards})
        if missing:
            raise UsageError(f"{index} names shards that are missing: {', '.join(missing[:3])}; copy the whole model")
    for shard in shards:
        check_safetensors(shard)
    return p


def check_device(device: str | None) -> None:
    """A requested CUDA device exists (None: the default, CUDA when available, is always fine)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"--device {device}: {why} here (torch {torch.__version__}); drop --device to run on the CPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)")


def largest_planner_turn(config) -> int:
    """Tokens of the longest planner turn a rollout can produce (prompt + response), see the module doc."""
    return config.agent.context_budget


def check_micro_batch(config) -> None:
    need, have = largest_planner_turn(config), config.trainer.micro_batch_tokens
    if have < need:
        raise UsageError(
            f"--micro-batch-tokens {have} is smaller than one planner turn, which can reach {need} tokens "
            f"(context_budget: prompt + response); pass --micro-batch-tokens {need} or more"
        )


def check_run(config) -> None:
    """Every check of a `flowgrpo train` configuration that needs no lock (see the module doc)."""
    run_dir = check_run_dir(config.run_dir)
    if config.task.data is not None:
        check_data(config.task.data)
    mc = config.model
    if mc.path is not None:
        check_model_dir(mc.path)
    elif mc.arch == "tiny":
        built = run_dir / "model"
        if built.is_dir() and any(built.iterdir()):
            if not (built / "config.json").is_file() or not any(built.glob("*.safetensors")):
                raise UsageError(
                    f"{built} holds an incomplete model (no config.json or weights); pass --restart to move the "
                    f"earlier run aside, or delete {built}"
                )
            check_model_dir(built)
    check_device(mc.device)
    check_micro_batch(config)


def earlier_run(run_dir: str | Path) -> list[str]:
    """What of an earlier run the directory holds: metrics, validation lines and checkpoint directories."""
    from engine.checkpoint import CHECKPOINTS

    p = Path(run_dir)
    found = [
        name for name in ("metrics.jsonl", "validation.jsonl") if (p / name).is_file() and (p / name).stat().st_size
    ]
    for sub in (CHECKPOINTS, "best/" + CHECKPOINTS):
        if (p / sub).is_dir():
            found += sorted(f"{sub}/{c.name}" for c in (p / sub).iterdir() if c.name.startswith("step_"))
    return found


def check_fresh(run_dir: str | Path) -> None:
    """Without --resume or --restart: refuse a directory that holds an earlier run (nothing is overwritten)."""
    found = earlier_run(run_dir)
    if found:
        raise UsageError(
            f"{run_dir} holds an earlier run ({', '.join(found[:4])}); pass --resume to continue it, "
            f"--restart to move it aside and start over, or another --run-dir"
        )


def check_resume(run_dir: str | Path) -> None:
    """For --resume: refuse when the directory holds an earlier run but no checkpoint that verifies."""
    from engine.checkpoint import load_latest

    skipped: list[str] = []
    if load_latest(run_dir, notes=skipped) is not None:
        return
    found = earlier_run(run_dir)
    if not found:
        return  # nothing to continue and nothing to overwrite: the run starts at step 1
    why = "; ".join(skipped) if skipped else "no checkpoint was written"
    raise UsageError(
        f"--resume: {run_dir} holds an earlier run ({', '.join(found[:4])}) but no complete checkpoint ({why}); "
        f"pass --restart instead of --resume to move it aside and start over"
    )
