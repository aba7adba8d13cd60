"""Two torchrun agents on this machine that meet as two "nodes" through a c10d rendezvous on localhost.

Each agent runs `python -m torch.distributed.run --nnodes 2 --nproc-per-node N ...` as on one node of a
cluster, so LOCAL_WORLD_SIZE is N and the world 2N: `engine.parallelize` then builds the 2-D HSDP mesh
(replicate 2, fsdp N). The c10d backend hands out the ranks in the order the agents arrive, so either
agent may hold rank 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(
    argv: Sequence[str], *, cwd: str | Path, env: dict[str, str], nproc_per_node: int = 1, timeout: float = 600
) -> str:
    """Run `argv` (a script and its arguments, or `-m module ...`) under two agents; both must exit 0.
    Returns the two agents' output (stdout and stderr), node 0's first. An agent that fails, or a run past
    `timeout`, stops the other (SIGTERM: torchrun stops its workers), so no rank is left in a collective."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc_per_node)]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-id", "two-nodes", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    with tempfile.TemporaryFile("w+") as out0, tempfile.TemporaryFile("w+") as out1:
        outs = (out0, out1)
        agents = [
            subprocess.Popen(
                [*launcher, "--node-rank", str(i), *argv], cwd=cwd, env=env, stdout=outs[i], stderr=subprocess.STDOUT
            )
            for i in range(2)
        ]
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in agents):
                if any(p.poll() for p in agents) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for p in agents:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in agents:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait()
        text = []
        for f in outs:
            f.seek(0)
            text.append(f.read())
    codes = [p.returncode for p in agents]
    assert codes == [0, 0], f"agents exited {codes} (timeout {timeout} s):\n" + "\n".join(t[-4000:] for t in text)
    return "".join(text)
