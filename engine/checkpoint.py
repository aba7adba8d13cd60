"""Crash-safe, verified checkpoints: planner weights (safetensors), optimizer state, step and RNG state.

Layout: `run_dir/checkpoints/step_000042/` holds `model.safetensors` (the planner's state dict,
tied weights stored once: an alias map in the safetensors metadata restores them), `config.json`
(so the directory also loads as a Hugging Face model), `optimizer.pt`, `state.json` (step, RNG
states, the caller's state such as config and metrics cursor, and the size of every file) and
`manifest.json` (a checksum of every other file).

Writing is atomic: everything goes into a hidden temp directory `.tmp-step_...`, each file is
fsynced, the manifest is written last, the directory is fsynced and renamed to `step_XXXXXX` (the
commit point), the parent is fsynced, and the `latest` pointer is replaced atomically (temp file +
`os.replace`). A writer killed at any moment leaves either the old set of checkpoints or the new
one, plus at worst hidden leftovers (`.tmp-*`, `.trash-*`) that readers ignore and the next save or
`clean_leftovers` removes (one writer per run directory: `engine.run_dir` holds the lock).

Checksums: sha256 (hashlib, so every machine can verify a checkpoint written on another; xxhash
would be faster but is an extra dependency) over blocks of `BLOCK_BYTES`, hashed by a thread pool
(hashlib releases the GIL), so verifying scales with cores: about 1.1 GB/s per core measured with
SHA-NI on an AMD EPYC. `load_latest` trusts the directories, not the pointer: it returns the newest
`step_*` directory whose files all match their manifest, and says which newer ones it skipped and
why (a file missing, a size or a block that does not match). Checkpoints of format 1 (no manifest)
are checked by file size only. Results are cached per process by (path, size, mtime).

Pruning keeps the last `keep_last` complete checkpoints. An old one is first renamed to a hidden
`.trash-step_...` name (one atomic rename, after which nothing looks like a checkpoint), then
deleted; older incomplete `step_*` directories (from an interrupted writer of an earlier version)
go the same way.

`engine.dist_checkpoint` writes the sharded checkpoints of a torchrun run into the same layout
(`state.json` says `layout: "dcp"` and the world size), with the same manifest, pointer and pruning,
so `load_latest` and `verify_checkpoint` serve both kinds; `load_checkpoint` refuses a sharded one.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.fsio import atomic_write_bytes, fsync_dir
from engine.preflight import UsageError

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 2
BLOCK_BYTES = 64 << 20
HASH = "sha256"
LEFTOVERS = (".tmp-*", ".old-*", ".trash-*", ".latest.tmp-*")
_ALIAS_KEY = "flowgrpo_aliases"


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    layout: str = "single"  # "single": this module's files; "dcp": engine.dist_checkpoint's shards
    world: int = 1  # ranks that wrote it
    rng_ranks: list[dict[str, Any]] = field(default_factory=list)  # "dcp": RNG states of each rank


def _read_complete(path: Path) -> Checkpoint | None:
    """The checkpoint in `path` if it looks complete (state.json parses, its files present with their sizes)."""
    return read_state(path)[0]


def read_state(path: Path) -> tuple[Checkpoint | None, str]:
    """(checkpoint, "") when state.json parses and the recorded files have their sizes, else (None, why)."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return None, f"incomplete, no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return None, f"{STATE_FILE} unreadable ({type(e).__name__})"
    try:
        for name, size in meta["files"].items():
            try:
                actual = (path / name).stat().st_size
            except FileNotFoundError:
                return None, f"{name} is missing"
            if actual != size:
                return None, f"{name} has {actual} bytes, {size} were written"
        return Checkpoint(
            path=path,
            step=int(meta["step"]),
            state=meta.get("state", {}),
            rng=meta.get("rng", {}),
            saved_at=meta["time"],
            layout=meta.get("layout", "single"),
            world=int(meta.get("world", 1)),
            rng_ranks=meta.get("rng_ranks", []),
        ), ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{STATE_FILE} is not a checkpoint's ({type(e).__name__})"


def _hash_block(path: Path, offset: int, length: int) -> str:
    h = hashlib.new(HASH)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < length:
            chunk = os.pread(fd, min(8 << 20, length - done), offset + done)
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def file_digests(paths: list[Path], block_bytes: int = BLOCK_BYTES) -> dict[str, dict[str, Any]]:
    """{name: {"size", HASH: [hex digest of each block]}} for `paths`, blocks hashed in parallel."""
    jobs = []
    sizes = {}
    for p in paths:
        sizes[p.name] = p.stat().st_size
        jobs += [
            (p, off, min(block_bytes, sizes[p.name] - off)) for off in range(0, max(sizes[p.name], 1), block_bytes)
        ]
    with cf.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1) or 1) as pool:
        digests = list(pool.map(lambda j: _hash_block(*j), jobs))
    out: dict[str, dict[str, Any]] = {p.name: {"size": sizes[p.name], HASH: []} for p in paths}
    for (p, _, _), d in zip(jobs, digests, strict=True):
        out[p.name][HASH].append(d)
    return out


def write_manifest(directory: Path, digests: dict[str, dict[str, Any]] | None = None) -> None:
    """Write `manifest.json` (fsynced) over every other file of `directory`; `digests`: already computed."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    if digests is None:
        digests = file_digests(files)
    if sorted(digests) != [p.name for p in files]:
        raise ValueError(f"digests of {sorted(digests)} given for the files {[p.name for p in files]}")
    manifest = {
        "format": FORMAT,
        "algorithm": HASH,
        "block_bytes": BLOCK_BYTES,
        "files": {name: digests[name] for name in sorted(digests)},
    }
    with open(directory / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())


_VERIFIED: dict[tuple, str] = {}


def verify_checkpoint(path: str | Path, names: Collection[str] | None = None) -> str:
    """ "" when every file of the checkpoint in `path` matches its manifest, else why not (one phrase).

    `names`: hash only these files of the manifest (the ranks of a sharded load split the work);
    the sizes of all files are still checked."""
    path = Path(path)
    ck, why = read_state(path)
    if ck is None:
        return why
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        if json.loads((path / STATE_FILE).read_text()).get("format", 1) < 2:
            return ""  # format 1: written before manifests, sizes checked above
        return f"{MANIFEST_FILE} is missing"
    except (OSError, ValueError):
        return f"{MANIFEST_FILE} is damaged"
    try:
        files = manifest["files"]
        if names is not None:
            files = {n: files[n] for n in files if n in names}
        algorithm, block = manifest["algorithm"], int(manifest["block_bytes"])
        if algorithm not in hashlib.algorithms_available:
            return f"{MANIFEST_FILE} uses {algorithm}, which this Python cannot compute"
        key = tuple((name, (path / name).stat().st_size, (path / name).stat().st_mtime_ns) for name in sorted(files))
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"{MANIFEST_FILE} is damaged"
    cache_key = (str(path.resolve()), key)
    if cache_key in _VERIFIED:
        return _VERIFIED[cache_key]
    why = ""
    if algorithm != HASH or block != BLOCK_BYTES:
        actual = {}
        for name in sorted(files):
            actual.update(_digests_with(path / name, algorithm, block))
    else:
        actual = file_digests([path / name for name in sorted(files)])
    for name in sorted(files):
        want, got = files[name], actual[name]
        if got["size"] != want.get("size"):
            why = f"{name} has {got['size']} bytes, {want.get('size')} were written"
            break
        bad = [i for i, (a, b) in enumerate(zip(got[algorithm], want.get(algorithm, []), strict=False)) if a != b]
        if bad or len(got[algorithm]) != len(want.get(algorithm, [])):
            i = bad[0] if bad else 0
            why = (
                f"{name} is damaged: bytes {i * block}..{min((i + 1) * block, got['size'])} do not match "
                f"their {algorithm}"
            )
            break
    _VERIFIED[cache_key] = why
    return why


def _digests_with(path: Path, algorithm: str, block: int) -> dict[str, dict[str, Any]]:
    size = path.stat().st_size
    out = []
    with open(path, "rb") as f:
        for _ in range(0, max(size, 1), block):
            out.append(hashlib.new(algorithm, f.read(block)).hexdigest())
    return {path.name: {"size": size, algorithm: out}}


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_NNNNNN` directory, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("step_") and p.name[5:].isdigit() and p.is_dir():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of the run (by file sizes), oldest first; hidden leftovers are ignored."""
    found = []
    for _, p in step_dirs(Path(run_dir) / CHECKPOINTS):
        if (ck := _read_complete(p)) is not None:
            found.append(ck)
    return sorted(found, key=lambda c: c.step)


def load_latest(run_dir: str | Path, *, verify: bool = True, notes: list[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies (with verify=False: that looks complete), or None.

    Each newer `step_*` directory passed over is reported in `notes` with the reason."""
    for _, p in reversed(step_dirs(Path(run_dir) / CHECKPOINTS)):
        why = verify_checkpoint(p) if verify else read_state(p)[1]
        if not why:
            return _read_complete(p)
        if notes is not None:
            notes.append(f"skipped checkpoint {p.name}: {why}")
    return None


def _discard(path: Path) -> None:
    """Delete a directory so that an interruption leaves no `step_*` behind: rename to .trash-*, then delete."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove what interrupted writers and pruners left in the checkpoint directory; returns the names.

    Only safe while no other process writes to the run (the caller holds `engine.run_dir`'s lock)."""
    root = Path(run_dir) / CHECKPOINTS
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for pattern in LEFTOVERS:
        for p in sorted(root.glob(pattern)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any] | None = None,
    *,
    keep_last: int = 3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically (see module doc) and return its directory. `state_dict`: the
    model's full state dict when the caller gathered it (an FSDP model's), else `model.state_dict()`."""
    from safetensors.torch import save_file

    tmp = make_temp_dir(run_dir, step, keep_last)

    tensors, aliases = _dedupe(model.state_dict() if state_dict is None else state_dict)
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
    write_manifest(tmp)
    fsync_dir(tmp)
    return commit(tmp, step, keep_last)


def make_temp_dir(run_dir: str | Path, step: int, keep_last: int) -> Path:
    """A new hidden `.tmp-step_...` directory to write checkpoint `step` into (leftovers removed first)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(run_dir)
    tmp = root / f".tmp-{step_dirname(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, keep_last: int) -> Path:
    """Rename the complete temp directory `tmp` to `step_NNNNNN` (the commit point), point `latest` at
    it and prune; returns the checkpoint's directory."""
    root = tmp.parent
    name = step_dirname(step)
    final = root / name
    if final.exists():  # re-saving a step (a resumed run repeating it): move the old one aside first
        old = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    _write_latest(root, name)
    _prune(root, keep_last, final)
    return final


def _prune(root: Path, keep_last: int, final: Path) -> None:
    """Discard all but the newest `keep_last` complete checkpoints, and incomplete directories older than those."""
    complete = [p for _, p in step_dirs(root) if _read_complete(p) is not None]
    kept = complete[-keep_last:]
    oldest_kept = min((int(p.name[5:]) for p in kept), default=0)
    for step, p in step_dirs(root):
        if p != final and p not in kept and step < oldest_kept:
            _discard(p)


def _write_latest(root: Path, name: str) -> None:
    atomic_write_bytes(root / "latest", (name + "\n").encode())


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
    if checkpoint.layout != "single":
        raise UsageError(
            f"{path} is a sharded checkpoint written by {checkpoint.world} ranks; "
            f"load it with engine.dist_checkpoint.load_sharded (any world size, one process included)"
        )
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
