"""The python sandbox holds against code written to escape it (issue 14): each test runs the real escape
through the real sandbox and checks, from the host, that it had no effect. Most escapes first switch
the audit hook off the way the issue found (`sys._getframe(1).f_globals`), so what they meet is the
kernel boundary, not Python. Only run_python and SandboxLimits' original fields are used here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentflow.tools.python_sandbox import SandboxLimits, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces")

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(wall_seconds=10.0, cpu_seconds=2, memory_mb=256)
DISABLE_HOOK = "import sys\ng = sys._getframe(1).f_globals\ng['_DENY'].clear()\ng['_inside'] = lambda p: True\n"


def _host_lacks_namespaces() -> str | None:
    """Why this host cannot run the sandbox, judged without the sandbox's code (util-linux unshare)."""
    exe = shutil.which("unshare")
    if exe is None:
        return "util-linux unshare is missing, cannot tell whether this host allows user namespaces"
    flags = ["--user", "--map-root-user", "--pid", "--fork", "--mount", "--net", "--ipc", "--uts", "--mount-proc"]
    p = subprocess.run([exe, *flags, "true"], capture_output=True, text=True, check=False)
    return None if p.returncode == 0 else f"this host refuses user namespaces: {p.stderr.strip()}"


@pytest.fixture(scope="module", autouse=True)
def _host_runs_the_sandbox():
    """Skip where the host lacks namespaces; where it has them, a refusal is a failure, not a skip."""
    why = _host_lacks_namespaces()
    if why:
        pytest.skip(why)
    r = run_python("print(1)", FAST)
    assert r.ok and r.text == "1", r.text


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.is_file() or p.is_symlink():
            p.unlink()


def test_switching_the_audit_hook_off_reaches_neither_processes_nor_files(tmp_path):
    """Issue: after clearing _DENY and _inside, os.system('id > FILE') ran as uid 0 and files landed anywhere."""
    name = f"escape-{uuid.uuid4().hex}"
    target = tmp_path / "id.txt"
    outside = [tmp_path / name, Path(sys.prefix) / name, Path("/etc") / name, Path("/usr") / name]
    code = DISABLE_HOOK + (
        f"import os\nprint('system', os.system('id > {target}'))\n"
        f"for p in {[str(p) for p in outside]!r}:\n"
        "    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n"
        "    except OSError as e:\n        print('blocked', p, type(e).__name__)\n"
    )
    try:
        r = run_python(code, FAST)
        assert r.ok, r.text
        assert "WROTE" not in r.text and r.text.count("blocked") == len(outside), r.text
        assert not target.exists(), target.read_text()
        assert not [p for p in outside if p.exists()]
    finally:
        _remove(target, *outside)


@pytest.mark.parametrize("hook", ["as is", "switched off"])
def test_chdir_then_relative_write_does_not_leave_the_working_directory(tmp_path, hook):
    """Issue: os.chdir(~) then open('y', 'w') wrote outside (relative paths were checked against the temp dir)."""
    name = f"escape-{uuid.uuid4().hex}"
    dirs = [os.path.expanduser("~"), str(tmp_path), sys.prefix, "/etc", "/"]
    code = (DISABLE_HOOK if hook == "switched off" else "") + (
        "import os\nos.chdir(os.path.expanduser('~'))\nopen('y', 'w').write('inside')\nhome = os.getcwd()\n"
        f"for d in {dirs!r}:\n"
        "    try:\n        os.chdir(d)\n"
        f"        open({name!r}, 'w').write('x')\n        print('WROTE', d)\n"
        "    except OSError as e:\n        print('blocked', d, type(e).__name__)\n"
    )
    landed = [Path(d) / name for d in dirs]
    try:
        r = run_python(code, FAST)
        assert r.ok, r.text
        assert "WROTE" not in r.text and r.text.count("blocked") == len(dirs), r.text
        assert not [p for p in landed if p.exists()]
    finally:
        _remove(*landed)


def test_the_parents_environment_cannot_be_read():
    """Issue: open(f'/proc/{os.getppid()}/environ') read the trainer's environment (HF_TOKEN, API keys)."""
    secret = f"hf_{uuid.uuid4().hex}"
    code = (
        "import glob, os\n"
        "for p in [f'/proc/{os.getppid()}/environ'] + sorted(glob.glob('/proc/[0-9]*/environ')):\n"
        "    try:\n        print(p, open(p, 'rb').read())\n"
        "    except OSError as e:\n        print(p, 'blocked', type(e).__name__)\n"
    )
    parent = (
        "import sys\nfrom agentflow.tools.python_sandbox import SandboxLimits, run_python\n"
        "r = run_python(sys.argv[1], SandboxLimits(wall_seconds=10.0, max_output_chars=100000))\nprint(r.ok, r.text)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_TOKEN": secret}
    p = subprocess.run(
        [sys.executable, "-c", parent, code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("True"), p.stdout
    assert "/environ" in p.stdout
    assert secret not in p.stdout, p.stdout


def test_the_parent_cannot_be_signalled():
    """Issue: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), SIGUSR1) reached the parent."""
    got: list[int] = []
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # a signal that arrives stays pending: no timing
    code = DISABLE_HOOK + (
        "import os, signal\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try:\n        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGUSR1)\n        print('sent', pid)\n"
        "    except OSError as e:\n        print('blocked', pid, type(e).__name__)\n"
        "    try:\n        os.kill(pid, signal.SIGUSR1)\n        print('killed', pid)\n"
        "    except OSError as e:\n        print('blocked', pid, type(e).__name__)\n"
    )
    try:
        r = run_python(code, FAST)
        pending = signal.SIGUSR1 in signal.sigpending()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, old_handler)
    assert r.ok, r.text
    assert not pending and not got, r.text


def _processes_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("max_processes, ending", [(None, "exit"), (8, "exit"), (8, "wall-clock kill")])
def test_a_setsid_child_dies_with_the_call(tmp_path, max_processes, ending):
    """Issue: a setsid child outlived the clean-up kill and kept writing after the call returned.

    With the default limits the fork itself fails (RLIMIT_NPROC 0 for a non-root uid); with
    max_processes=8 it succeeds, and the PID namespace must take the child down with the call, whether
    the program exits or is killed at the wall-clock limit."""
    marker = f"flowgrpo-escape-{uuid.uuid4().hex}"
    target = tmp_path / "late.txt"
    loop = f"while :; do echo x >> {target}; echo x >> late.txt; sleep 0.05; done # {marker}"
    code = DISABLE_HOOK + (
        "import os\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    os.closerange(0, 256)\n"
        f"    os.execv('/bin/sh', ['sh', '-c', {loop!r}])\nprint('forked', flush=True)\n"
    )
    if ending == "wall-clock kill":
        code += "import time\ntime.sleep(600)\n"
    wall = 10.0 if ending == "exit" else 2.0
    limits = FAST if max_processes is None else SandboxLimits(wall_seconds=wall, max_processes=max_processes)
    try:
        r = run_python(code, limits)
        alive = _processes_with(marker)
        assert alive == [], f"sandboxed processes outlived the call: {alive}"
        assert not target.exists()
        if max_processes is None:
            assert "BlockingIOError" in r.text, r.text
        elif ending == "exit":
            assert r.ok and r.text == "forked", r.text
        else:
            assert r.text == "forked\nerror: wall-clock time limit exceeded (2 s); the program was killed", r.text
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_code_runs_unprivileged_in_its_own_namespaces():
    """What the escapes above meet: a non-root uid, no capabilities, no_new_privs, seccomp, own /proc, no network."""
    code = DISABLE_HOOK + (
        "import ctypes, os, socket\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "print(os.getuid(), os.getgid(), st['CapEff'].strip(), st['CapBnd'].strip(), st['NoNewPrivs'].strip(),"
        " st['Seccomp'].strip())\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno(), libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None),"
        " ctypes.get_errno())\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\nexcept OSError as e:\n    print(e.errno)\n"
    )
    r = run_python(code, FAST)
    assert r.ok, r.text
    ids, pids, calls, net = r.text.splitlines()
    assert ids.split() == ["65534", "65534", "0000000000000000", "0000000000000000", "1", "2"]
    assert pids == "[1, 2]"  # the sandbox's init and the program: no host process is visible
    assert calls == "-1 1 -1 1"  # unshare and mount: EPERM (seccomp)
    assert net == "101"  # ENETUNREACH: the network namespace has no route


def test_the_sandbox_dies_with_a_killed_trainer(tmp_path):
    """SIGKILL of the trainer mid-call (no clean-up code runs) must still take every sandboxed process down."""
    marker = f"flowgrpo-escape-{uuid.uuid4().hex}"
    code = DISABLE_HOOK + f"import os\nos.execv('/bin/sh', ['sh', '-c', 'while :; do sleep 0.05; done # {marker}'])\n"
    parent = (
        "import sys\nfrom agentflow.tools.python_sandbox import SandboxLimits, run_python\n"
        "run_python(sys.argv[1], SandboxLimits(wall_seconds=600.0, max_processes=4))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}  # what the killed trainer leaves
    trainer = subprocess.Popen([sys.executable, "-c", parent, code], env=env)

    def sandboxed():  # the trainer's own command line holds the marker too
        return [pid for pid in _processes_with(marker) if pid != trainer.pid]

    try:
        deadline = time.monotonic() + 120
        while not sandboxed() and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sandboxed(), "the sandboxed loop never started"
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 30  # the kernel tears the namespaces down asynchronously
        while sandboxed() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sandboxed() == [], "sandboxed processes outlived the trainer"
    finally:
        trainer.kill()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
