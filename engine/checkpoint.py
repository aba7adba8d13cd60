"""Crash-safe checkpoints: planner weights (safetensors), optimizer state, step and RNG state.

Layout: `run_dir/checkpoints/step_000042/` holds `model.safetensors` (the planner's state dict,
tied weights stored once: an alias map in the safetensors metadata restores them), `config.json`
(so the directory also loads as a Hugging Face model), `optimizer.pt`, and `state.json` (step,
RNG states, the caller's state such as config and metrics cursor, and the size of every file).

Writing is atomic: everything goes into a hidden temp directory `.tmp-step_...`, each file is
fsynced, the directory is fsynced and renamed to `step_XXXXXX` (the commit point), the parent is
fsynced, and the `latest` pointer is replaced atomically (temp file + `os.replace`). A writer killed
at any moment leaves either the old set of checkpoints or the new one, plus at worst a temp
directory that readers ignore and the next save removes (one writer per run directory).
`load_latest` trusts the directories, not the pointer: it returns the newest `step_*` directory
whose `state.json` parses and whose files have the recorded sizes. The last `keep_last`
checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
FORMAT = 1
_ALIAS_KEY = "flowgrpo_aliases"


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when initialised) CUDA generator states, JSON-serialisable."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(rng["torch"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in rng["cuda"]])


def _dedupe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Host copies with tensors that are the same view stored once; aliases maps dropped key → kept key."""
    kept: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        ident = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() and ident in kept:
            aliases[name] = kept[ident]
            continue
        kept[ident] = name
        host = t.detach().to("cpu").contiguous()
        ptr = host.untyped_storage().data_ptr()
        if ptr in storages:  # a different view of storage already saved: safetensors needs its own copy
            host = host.clone()
        storages.add(host.untyped_storage().data_ptr())
        tensors[name] = host
    return tensors, aliases


@dataclass
class Checkpoint:
    """A complete checkpoint directory and what its state.json says."""

    path: Path
    step: int
    state: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    saved_at: float = 0.0


def _read_complete(path: Path) -> Checkpoint | None:
    """The checkpoint in `path` if it is complete (state.json parses, recorded files present with their sizes)."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        for name, size in meta["files"].items():
            if (path / name).stat().st_size != size:
                return None
        return Checkpoint(
            path=path,
            step=int(meta["step"]),
            state=meta.get("state", {}),
            rng=meta.get("rng", {}),
            saved_at=meta["time"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of the run, oldest first (temp directories of killed writers are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (ck := _read_complete(p)) is not None:
            found.append(ck)
    return sorted(found, key=lambda c: c.step)


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint of the run, or None when there is none."""
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any] | None = None,
    *,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` atomically (see module doc) and return its directory."""
    from safetensors.torch import save_file

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = step_dirname(step)
    tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()

    tensors, aliases = _dedupe(model.state_dict())
    save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt", _ALIAS_KEY: json.dumps(aliases)})
    del tensors
    _fsync_file(tmp / MODEL_FILE)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(tmp / CONFIG_FILE)
        _fsync_file(tmp / CONFIG_FILE)
    if optimizer is not None:
        with open(tmp / OPTIMIZER_FILE, "wb") as f:
            torch.save(optimizer.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    meta = {
        "format": FORMAT,
        "step": int(step),
        "time": time.time(),
        "files": files,
        "rng": capture_rng(),
        "state": state or {},
    }
    with open(tmp / STATE_FILE, "w") as f:
        f.write(json.dumps(meta, indent=1, allow_nan=False, default=str))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)

    final = root / name
    if final.exists():  # re-saving a step (a resumed run repeating it): move the old one aside first
        old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _write_latest(root, name)

    complete = list_checkpoints(run_dir)
    for ck in complete[: max(0, len(complete) - keep_last)]:
        if ck.path != final:
            shutil.rmtree(ck.path, ignore_errors=True)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".latest.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def load_checkpoint(
    checkpoint: Checkpoint | str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng_state: bool = True,
) -> Checkpoint:
    """Restore weights (exactly: same dtype required), optimizer state and RNG states from a checkpoint."""
    from safetensors import safe_open

    if not isinstance(checkpoint, Checkpoint):
        path = Path(checkpoint)
        ck = _read_complete(path)
        if ck is None:
            raise FileNotFoundError(f"{path} is not a complete checkpoint (missing/partial {STATE_FILE} or files)")
        checkpoint = ck
    path = checkpoint.path
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    with safe_open(path / MODEL_FILE, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIAS_KEY, "{}"))
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            loaded[key] = f.get_tensor(key)
    for alias, target in aliases.items():
        loaded[alias] = loaded[target]
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            f"was it written for another architecture?"
        )
    for key, t in loaded.items():
        if t.dtype != own[key].dtype or t.shape != own[key].shape:
            raise ValueError(
                f"checkpoint {path}: {key} is {t.dtype} {tuple(t.shape)} but the model has "
                f"{own[key].dtype} {tuple(own[key].shape)}; load the model in the dtype it was trained in"
            )
    with torch.no_grad():
        for key, t in own.items():
            t.copy_(loaded[key])
    if optimizer is not None:
        opt_path = path / OPTIMIZER_FILE
        if not opt_path.exists():
            raise FileNotFoundError(f"checkpoint {path} has no {OPTIMIZER_FILE} (saved without an optimizer)")
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=True))
    if restore_rng_state and checkpoint.rng:
        restore_rng(checkpoint.rng)
    return checkpoint
