"""The python tool: model-written code in a sandboxed subprocess.

Each run gets a fresh temporary working directory (deleted afterwards), a minimal environment
(HOME and TMPDIR point into it) and `python -I -B` (isolated mode, no bytecode writes). Layers:

- Kernel limits, set in the child before the code runs: RLIMIT_CPU (CPU seconds; SIGXCPU/SIGKILL),
  RLIMIT_AS (address space: large allocations raise MemoryError), RLIMIT_FSIZE (file size),
  RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC=0 (no new processes, and for a non-root user no
  new threads either; the kernel does NOT enforce RLIMIT_NPROC for root, so for root the audit hook
  below is what stops forks).
- Wall clock: the child runs in its own session; on time-out the whole process group is killed.
  The group is also killed after a normal exit, so no stray child survives.
- Network: when `unshare -n` works (root, or unprivileged user namespaces via `unshare -rn`), the
  child runs in an empty network namespace (only a down loopback), which stops every socket at the
  kernel, C extensions included. It is detected once per process; `network_isolation()` says which.
- A Python audit hook (`sys.addaudithook`), installed before the code runs, raises PermissionError
  on: socket creation/connect/bind and name resolution; process creation (os.fork/forkpty,
  posix_spawn, spawn*, exec*, system, subprocess.Popen, and the low-level `_posixsubprocess.fork_exec`
  is replaced); os.kill/killpg; loading C libraries or looking up C functions through ctypes
  (ctypes itself is imported before the hook so numpy still imports); and writes outside the working
  directory (open/os.open with a write mode or write/create/truncate flags, remove, rename, mkdir,
  rmdir, chmod, chown, link, symlink, truncate, utime), with symlinks resolved.

What it does not stop: the audit hook is not a security boundary against code written to defeat it
(CPython's own documentation says so): C extensions that call libc directly bypass it, reads of any
readable file are allowed (imports need them), and without a network namespace a C extension could
open a socket. The rlimits, the session kill and the network namespace are kernel-enforced.

Output: stdout and stderr are drained concurrently and capped (the rest is discarded, so a print
loop cannot exhaust memory); if the last statement is an expression its repr is printed, as in a
REPL. Every failure (limits, exceptions, blocked actions) comes back as a one-paragraph error text.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from agentflow.tools.base import Tool, ToolResult, error, truncate


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one python run. `network_namespace=False` relies on the audit hook alone."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 2
    memory_mb: int = 512
    file_size_mb: int = 16
    max_open_files: int = 64
    max_output_chars: int = 4000
    network_namespace: bool = True

    def __post_init__(self) -> None:
        if self.wall_seconds <= 0 or self.cpu_seconds < 1:
            raise ValueError(
                f"wall_seconds must be > 0 and cpu_seconds >= 1, got {self.wall_seconds}, {self.cpu_seconds}"
            )
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter itself needs ~30 MB), got {self.memory_mb}")


# Runs in the child as `python -I -B -c BOOTSTRAP LIMITS_JSON`, cwd = the fresh working directory.
BOOTSTRAP = r"""
import ast, json, os, resource, sys
L = json.loads(sys.argv[1])
WORK = os.path.realpath(os.getcwd())
MB = 1 << 20
for lim, val in ((resource.RLIMIT_CPU, L["cpu_seconds"]), (resource.RLIMIT_AS, L["memory_mb"] * MB),
                 (resource.RLIMIT_FSIZE, L["file_size_mb"] * MB), (resource.RLIMIT_NOFILE, L["max_open_files"]),
                 (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
    hard = val + 1 if lim == resource.RLIMIT_CPU else val
    resource.setrlimit(lim, (val, hard))
import ctypes, subprocess, _posixsubprocess
def _no_fork_exec(*a, **k):
    raise PermissionError("sandbox: creating processes is disabled")
_posixsubprocess.fork_exec = _no_fork_exec
_DENY = {
    "socket.__new__": "network access is disabled", "socket.connect": "network access is disabled",
    "socket.bind": "network access is disabled", "socket.getaddrinfo": "network access is disabled",
    "socket.gethostbyname": "network access is disabled", "socket.gethostbyaddr": "network access is disabled",
    "socket.sendto": "network access is disabled",
    "os.fork": "creating processes is disabled", "os.forkpty": "creating processes is disabled",
    "os.posix_spawn": "creating processes is disabled", "os.spawn": "creating processes is disabled",
    "os.exec": "creating processes is disabled", "os.system": "creating processes is disabled",
    "subprocess.Popen": "creating processes is disabled", "os.kill": "sending signals is disabled",
    "os.killpg": "sending signals is disabled", "ctypes.dlopen": "loading C libraries (ctypes) is disabled",
    "ctypes.dlsym": "calling C functions (ctypes) is disabled",
    "ctypes.dlsym/handle": "calling C functions (ctypes) is disabled",
    "ctypes.call_function": "calling C functions (ctypes) is disabled",
}
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                "os.symlink": (1,), "shutil.rmtree": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    p = os.path.realpath(os.path.join(WORK, os.fspath(path)))
    return p == WORK or p.startswith(WORK + os.sep)
def _hook(event, args):
    why = _DENY.get(event)
    if why:
        raise PermissionError("sandbox: " + why)
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled ({path})")
    elif event in _PATH_EVENTS:
        for i in _PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                raise PermissionError(f"sandbox: changing files outside the working directory is disabled ({args[i]})")
    elif event == "import" and args[0] in ("_posixsubprocess", "_ctypes"):  # a second, unpatched copy
        raise PermissionError(f"sandbox: importing {args[0]} is disabled")
with open("main.py", encoding="utf-8") as f:
    SOURCE = f.read()
sys.addaudithook(_hook)
sys.argv = ["main.py"]
tree = ast.parse(SOURCE, "main.py")
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
ns = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(tree, "main.py", "exec"), ns)
if last is not None:
    value = eval(compile(ast.Expression(last.value), "main.py", "eval"), ns)
    if value is not None:
        print(repr(value))
"""


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The command prefix that puts a child in an empty network namespace, or () if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "-n"), (exe, "-rn")):
        try:
            r = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return ()


def _drain(stream, cap: int, sink: list[bytes]) -> None:
    """Read `stream` to EOF, keeping the first `cap` bytes and counting the rest."""
    kept, dropped = 0, 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        if kept < cap:
            take = chunk[: cap - kept]
            sink.append(take)
            kept += len(take)
            dropped += len(chunk) - len(take)
        else:
            dropped += len(chunk)
    if dropped:
        sink.append(f"\n... [output truncated: {dropped} more bytes]".encode())


def _last_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run `code` in the sandbox; the result text is its output or a clean error."""
    if not code.strip():
        return error("no code to run")
    work = tempfile.mkdtemp(prefix="flowgrpo-py-")
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        prefix = network_isolation() if limits.network_namespace else ()
        cmd = [*prefix, sys.executable, "-I", "-B", "-c", BOOTSTRAP, json.dumps(asdict(limits))]
        cap = limits.max_output_chars * 4  # bytes; decoded text is truncated to max_output_chars below
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, cap, out), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, cap, err), daemon=True),
        ]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)
        proc.wait()
        for r in readers:
            r.join(timeout=5)
        wall = time.perf_counter() - t0
        stdout = b"".join(out).decode("utf-8", "replace")
        stderr = b"".join(err).decode("utf-8", "replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _interpret(proc.returncode, timed_out, wall, stdout, stderr, limits)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _interpret(rc: int, timed_out: bool, wall: float, stdout: str, stderr: str, limits: SandboxLimits) -> ToolResult:
    shown = truncate(stdout, limits.max_output_chars)
    prefix = (shown.rstrip() + "\n") if shown.strip() else ""
    if timed_out:
        return ToolResult(
            False, prefix + f"error: wall-clock time limit exceeded ({limits.wall_seconds:g} s); the program was killed"
        )
    if rc in (-signal.SIGXCPU, -signal.SIGKILL) and "Traceback" not in stderr:
        return ToolResult(
            False, prefix + f"error: CPU time limit exceeded ({limits.cpu_seconds} s); the program was killed"
        )
    if rc == -signal.SIGXFSZ:
        return ToolResult(False, prefix + f"error: file size limit exceeded ({limits.file_size_mb} MiB)")
    if rc < 0:
        return ToolResult(False, prefix + f"error: the program was killed by signal {signal.Signals(-rc).name}")
    if rc != 0:
        last = _last_error_line(stderr) or f"exit status {rc}"
        if last.startswith("MemoryError"):
            last += f" (memory limit {limits.memory_mb} MiB)"
        return ToolResult(False, prefix + "error: " + truncate(last, 500))
    if stderr.strip():
        prefix += "stderr: " + truncate(stderr.strip(), 500)
    return ToolResult(True, prefix.rstrip() or "(no output)")


class PythonTool(Tool):
    name = "python"
    description = "runs a short Python program and returns what it prints"
    command_format = "a complete Python program that prints its result"

    def __init__(self, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits

    def command_from(self, sub_goal: str, query: str) -> str:
        """The code of the sub-goal: the first ``` fenced block if there is one, else the whole text."""
        text = sub_goal.strip()
        if "```" in text:
            body = text.split("```", 2)[1]
            if body.startswith("python\n"):
                body = body[len("python\n") :]
            return body.strip("\n")
        return text

    def run(self, command: str) -> ToolResult:
        return run_python(command, self.limits)
