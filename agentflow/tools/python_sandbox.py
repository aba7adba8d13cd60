"""The python tool: model-written code in an operating-system sandbox.

The boundary is the kernel, not Python. Each run gets a fresh working directory and a tree of
processes that the kernel isolates:

    trainer --Popen--> launcher A --fork--> B0 --fork--> B (pid 1 of the sandbox) --fork+exec--> python C

- Namespaces. B0 calls unshare(CLONE_NEWUSER | NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS); A, still
  outside, writes B0's uid/gid maps: the only mapped id is 65534 ("nobody"), mapped to the host's
  65534 when the trainer runs as root and to the trainer's own uid otherwise. So the code runs as a
  non-root uid with no capabilities, no other uid exists inside, and, when the trainer is root,
  the code's files and processes belong to an unprivileged host uid. In the new PID namespace the
  trainer and every other host process are invisible (the program's parent is the sandbox's init,
  pid 1; /proc lists the sandbox only), so they can be neither signalled nor read (no
  /proc/<pid>/environ of the trainer). The network namespace
  holds a down loopback only. B is the namespace's init: when it exits, the kernel kills every
  process left in the namespace (setsid or not) and waits for them before B's parent sees the exit,
  so nothing outlives the call. A and B0 die with their parent (PR_SET_PDEATHSIG), B with B0.
- File system. B builds a new root in a private mount namespace and pivots into it: read-only
  recursive bind mounts of /usr, /etc, the /bin-/lib* entries and the interpreter's prefixes (venv
  and base install), a fresh /proc of the sandbox's PID namespace, /dev with null, zero, full,
  random and urandom only, a small tmpfs /dev/shm, and the working directory at /sandbox, the only
  writable place (/tmp is a link to it). Every mount is nosuid; the rest of the host (homes, /work,
  /root, /var, /run, /sys, sockets) does not exist inside. HOME, TMPDIR and cwd are /sandbox.
- Privileges. After pivot_root, B drops to uid/gid 65534, empties the capability bounding set and
  its own capabilities, sets no_new_privs, and installs a seccomp filter (x86-64 and arm64) that
  refuses mount/namespace/ptrace/bpf/perf/keyring/module/kexec/io_uring calls, clone with any
  CLONE_NEW* flag, and clone3 (ENOSYS, so libc falls back to clone, whose flags the filter sees).
- Limits, set in C before the code runs: RLIMIT_CPU (SIGXCPU, then SIGKILL), RLIMIT_AS (large
  allocations raise MemoryError), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, and RLIMIT_NPROC =
  `max_processes` (0 by default: no process or thread besides the program; the kernel counts it per
  uid in the sandbox's user namespace and enforces it because the uid is not root). Wall clock:
  on time-out the trainer SIGKILLs B, which takes the whole namespace with it.
- A Python audit hook in C, on top, turns the common attempts (sockets, processes when
  max_processes is 0, ctypes, writes outside the working directory) into one clear PermissionError
  line. It is a courtesy for the model, not the boundary: code that switches it off (it can) meets
  the kernel limits above.

What the host must provide, or the run is refused (fail closed, one line naming what is missing,
the code is never run unsandboxed): Linux >= 5.12 (mount_setattr) on x86-64 or arm64; user
namespaces the trainer's uid may create (root always may unless the sysctl
user.max_user_namespaces is 0; a non-root trainer needs unprivileged user namespaces:
kernel.unprivileged_userns_clone=1 on Debian kernels, kernel.apparmor_restrict_unprivileged_userns=0
on Ubuntu >= 23.10); a /proc that is not partly over-mounted (as in some containers), since a
fresh procfs may then not be mounted. No package beyond the Python standard library is needed.

Simplifications: reads of /etc and of the interpreter's installation are allowed (imports need
them); the working directory is on the host's disk, bounded per file (RLIMIT_FSIZE) but not in
total; the seccomp filter is a deny-list. Cost: one more interpreter start than running the code
directly (measured +0.27 s median per call on the 2-core CI machine under load ~18).

Output: stdout and stderr are drained concurrently and capped (the rest is counted and discarded,
so a print loop cannot exhaust memory); the note at the end says how many bytes were dropped. If
the last statement is an expression its repr is printed, as in a REPL. Every failure (limits,
exceptions, blocked actions) comes back as a one-paragraph error text.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from agentflow.tools.base import Tool, ToolResult, error, truncate


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one python run. `max_processes` caps processes and threads besides the program."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 2
    memory_mb: int = 512
    file_size_mb: int = 16
    max_open_files: int = 64
    max_output_chars: int = 4000
    max_processes: int = 0

    def __post_init__(self) -> None:
        if self.wall_seconds <= 0 or self.cpu_seconds < 1:
            raise ValueError(
                f"wall_seconds must be > 0 and cpu_seconds >= 1, got {self.wall_seconds}, {self.cpu_seconds}"
            )
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter itself needs ~30 MB), got {self.memory_mb}")
        if self.file_size_mb < 1 or self.max_open_files < 16 or self.max_output_chars < 1 or self.max_processes < 0:
            raise ValueError(
                "file_size_mb >= 1, max_open_files >= 16, max_output_chars >= 1 and max_processes >= 0 are "
                f"required, got {self.file_size_mb}, {self.max_open_files}, {self.max_output_chars}, "
                f"{self.max_processes}"
            )


SANDBOX_ID = 65534  # the only uid/gid inside ("nobody"); on the host too when the trainer is root
SANDBOX_DIR = "/sandbox"  # the working directory as the code sees it
REFUSAL = "python sandbox unavailable"

# Runs in C as `python -I -B -c BOOTSTRAP LIMITS_JSON`, cwd = /sandbox, after B has isolated it.
BOOTSTRAP = r"""
import ast, json, os, resource, sys
L = json.loads(sys.argv[1])
WORK = os.path.realpath(os.getcwd())
MB = 1 << 20
for lim, val in ((resource.RLIMIT_CPU, L["cpu_seconds"]), (resource.RLIMIT_AS, L["memory_mb"] * MB),
                 (resource.RLIMIT_FSIZE, L["file_size_mb"] * MB), (resource.RLIMIT_NOFILE, L["max_open_files"]),
                 (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, L["max_processes"])):
    hard = val + 1 if lim == resource.RLIMIT_CPU else val
    resource.setrlimit(lim, (val, hard))
import ctypes, subprocess, _posixsubprocess
_DENY = {
    "socket.__new__": "network access is disabled", "socket.connect": "network access is disabled",
    "socket.bind": "network access is disabled", "socket.getaddrinfo": "network access is disabled",
    "socket.gethostbyname": "network access is disabled", "socket.gethostbyaddr": "network access is disabled",
    "socket.sendto": "network access is disabled",
    "os.kill": "sending signals is disabled", "os.killpg": "sending signals is disabled",
    "ctypes.dlopen": "loading C libraries (ctypes) is disabled",
    "ctypes.dlsym": "calling C functions (ctypes) is disabled",
    "ctypes.dlsym/handle": "calling C functions (ctypes) is disabled",
    "ctypes.call_function": "calling C functions (ctypes) is disabled",
}
if L["max_processes"] == 0:
    def _no_fork_exec(*a, **k):
        raise PermissionError("sandbox: creating processes is disabled")
    _posixsubprocess.fork_exec = _no_fork_exec
    for _e in ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen"):
        _DENY[_e] = "creating processes is disabled"
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                "os.symlink": (1,), "shutil.rmtree": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    p = os.path.realpath(os.fspath(path))
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
    elif event == "import" and args[0] in ("_posixsubprocess", "_ctypes") and L["max_processes"] == 0:
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

# Runs as A (`python -I -S -B -c LAUNCHER CONFIG_JSON`), forks B0 and B. Trusted code: it only executes
# the plan the trainer computed (`_plan`). Status lines (JSON) go to the inherited status fd:
# {"init": host pid of B}, {"status": wait status of C}, or {"setup_error": "..."} before any user code.
LAUNCHER = r"""
import ctypes, json, os, resource, select, signal, struct, sys
C = json.loads(sys.argv[1])
ST = C["status_fd"]
NR = C["syscalls"]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def report(**kw):
    os.write(ST, (json.dumps(kw) + "\n").encode())
def fail(step, err=None):
    err = ctypes.get_errno() if err is None else err
    report(setup_error=f"{step}: {os.strerror(err) if isinstance(err, int) else err}")
    os._exit(125)
def check(rc, step):
    if rc < 0:
        fail(step)
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    rc = libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data))
    check(rc, f"mount {src or fstype} on {dst}")
def setattr_(path, attr, recursive):
    buf = ctypes.create_string_buffer(struct.pack("QQQQ", attr, 0, 0, 0))
    rc = libc.syscall(ctypes.c_long(NR["mount_setattr"]), ctypes.c_int(-100), path.encode(),
                      ctypes.c_uint(0x8000 if recursive else 0), buf, ctypes.c_size_t(32))
    if rc < 0 and ctypes.get_errno() == 38:
        fail("mount_setattr", "the kernel lacks it (Linux >= 5.12 is required)")
    check(rc, f"mount_setattr {path}")
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 24, 38, 22
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
AT_RDONLY, AT_NOSUID, AT_NODEV, AT_NOEXEC = 1, 2, 4, 8
def die_with_parent():
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
def init(b0_alive):
    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):  # init ignores default-action signals from inside
        signal.signal(sig, signal.SIG_DFL)
    R = C["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(R, R, None, MS_BIND)
    for src, dst, kind in C["binds"]:
        if kind == "ro":
            mount(src, dst, None, MS_BIND | MS_REC)
            setattr_(dst, AT_RDONLY | AT_NOSUID | AT_NODEV, True)
        elif kind == "dev":
            mount(src, dst, None, MS_BIND)
            setattr_(dst, AT_NOSUID | AT_NOEXEC, False)
        else:
            mount(src, dst, None, MS_BIND)
            setattr_(dst, AT_NOSUID | AT_NODEV, False)
    for dst, opts in C["tmpfs"]:
        mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    mount("proc", C["proc"], "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    setattr_(R, AT_RDONLY | AT_NOSUID | AT_NODEV, False)
    os.chdir(R)
    check(libc.syscall(ctypes.c_long(NR["pivot_root"]), b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "detaching the old root")
    os.chdir(C["cwd"])
    name = C["hostname"].encode()
    check(libc.sethostname(name, ctypes.c_size_t(len(name))), "sethostname")
    os.setresgid(C["id"], C["id"], C["id"])
    os.setresuid(C["id"], C["id"], C["id"])
    die_with_parent()  # changing uid/gid cleared it; if B0 died in between, its end of b0_alive is closed
    if select.select([b0_alive], [], [], 0)[0]:
        os._exit(125)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))
    check(libc.syscall(ctypes.c_long(NR["capset"]), header, ctypes.create_string_buffer(24)), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    prog = bytes.fromhex(C["seccomp"])
    filt = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(filt))
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.create_string_buffer(fprog), 0, 0), "installing the seccomp filter")
    os.set_inheritable(ST, False)
    argv = C["argv"]
    child = os.fork()
    if child == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    while True:
        pid, ws = os.wait()
        if pid == child:
            break
    report(status=ws)
    os._exit(0)
try:
    me = os.getpid()
    die_with_parent()
    if os.getppid() != C["parent"]:
        os._exit(125)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0:
        try:
            os.setgroups([])
        except PermissionError:  # root of a user namespace whose setgroups is denied: groups stay as they are
            pass
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    b0 = os.fork()
    if b0 == 0:
        os.close(r1)
        os.close(w2)
        die_with_parent()
        if os.getppid() != me:
            os._exit(125)
        if libc.unshare(ctypes.c_int(C["clone_flags"])) != 0:
            fail("creating user, mount, PID, network, IPC and UTS namespaces (unshare) failed",
                 os.strerror(ctypes.get_errno()) + "; the host must allow user namespaces for this uid"
                 " (user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1,"
                 " kernel.apparmor_restrict_unprivileged_userns=0) or run the trainer as root")
        os.write(w1, b"u")
        if os.read(r2, 1) != b"m":
            os._exit(125)
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(alive_w)
            try:
                init(alive_r)
            except OSError as e:
                fail("sandbox set-up", f"{e}")
        os.close(alive_r)
        report(init=pid)
        os.waitpid(pid, 0)
        os._exit(0)
    os.close(w1)
    os.close(r2)
    if os.read(r1, 1) != b"u":
        os.waitpid(b0, 0)
        os._exit(125)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", C["uid_map"]), ("gid_map", C["gid_map"])):
            with open(f"/proc/{b0}/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        os.kill(b0, signal.SIGKILL)
        os.waitpid(b0, 0)
        fail("writing the sandbox's uid/gid maps", f"{e}")
    os.write(w2, b"m")
    os.waitpid(b0, 0)
    os._exit(0)
except OSError as e:
    fail("sandbox launcher", f"{e}")
"""

# Syscall numbers: (x86-64, from asm/unistd_64.h; arm64, from the generic asm-generic/unistd.h).
_SYSCALLS = {
    "ptrace": (101, 117),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "init_module": (175, 105),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "finit_module": (313, 273),
    "unshare": (272, 97),
    "setns": (308, 268),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "userfaultfd": (323, 282),
    "acct": (163, 89),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "quotactl": (179, 60),
    "syslog": (103, 116),
    "capset": (126, 91),
    "clone": (56, 220),
    "clone3": (435, 435),
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # linux/audit.h
# Refused with EPERM: everything that reconfigures the kernel, namespaces or mounts, or reaches other
# processes' memory; clone3 gets ENOSYS (libc then uses clone, whose flags the filter can read).
_DENIED = tuple(name for name in _SYSCALLS if name not in ("capset", "clone", "clone3"))


def _nr(name: str, machine: str) -> int:
    return _SYSCALLS[name][0 if machine == "x86_64" else 1]


_CLONE_NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
_UNSHARE = 0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000


def seccomp_program(machine: str) -> bytes:
    """The classic-BPF seccomp filter for `machine` ("x86_64" or "aarch64"): deny-list, allow the rest."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, deny, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    # (code, jt_label_or_offset, jf, k); labels resolved below
    prog: list[tuple[int, object, object, int]] = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[machine]), (ret, 0, 0, kill)]
    prog.append((ld, 0, 0, 0))
    if machine == "x86_64":  # the x32 ABI shares the arch value; refuse it outright
        prog.append((jge, "deny", 0, 0x40000000))
    prog.append((jeq, "enosys", 0, _nr("clone3", machine)))
    prog += [(jeq, "deny", 0, _nr(name, machine)) for name in _DENIED]
    prog.append((jeq, 0, "allow", _nr("clone", machine)))
    prog.append((ld, 0, 0, 16))  # low 32 bits of args[0] (little-endian): the clone flags
    prog.append((jset, "deny", "allow", _CLONE_NS))
    labels = {"allow": len(prog), "deny": len(prog) + 1, "enosys": len(prog) + 2}
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, enosys)]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("<HBBI", code, jt, jf, k)
    return bytes(out)


def _ro_paths() -> list[tuple[str, str]]:
    """(path inside, host source) of the read-only binds: system dirs and the interpreter's prefixes."""
    wanted = ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    wanted += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    wanted.append(os.path.dirname(os.path.realpath(sys.executable)))
    out: list[tuple[str, str]] = []
    for p in wanted:
        if os.path.lexists(p):
            out.append((p, p))
            real = os.path.realpath(p)
            if real != p:
                out.append((real, real))
    return out


@functools.cache
def _skeleton_plan() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Symlinks to recreate and directories to bind read-only, each covered path once."""
    links, dirs = [], []
    for inside, src in sorted(set(_ro_paths()), key=lambda t: len(t[0])):
        if any(inside == d or inside.startswith(d.rstrip("/") + "/") for d, _ in dirs + links):
            continue
        if os.path.islink(src):
            links.append((inside, os.readlink(src)))
        elif os.path.isdir(src):
            dirs.append((inside, src))
    return tuple(links), tuple(dirs)


def _build_root(base: str, work: str, limits: SandboxLimits) -> dict:
    """Create the skeleton of the new root under `base/root` and the launcher's mount plan."""
    root = os.path.join(base, "root")
    links, dirs = _skeleton_plan()
    reserved = (SANDBOX_DIR, "/proc", "/dev")
    for inside, _ in (*links, *dirs):
        if any(inside == r or inside.startswith(r + "/") for r in reserved):
            raise _Refused(f"the interpreter lives under {inside}, a path the sandbox reserves; install it elsewhere")
    for inside, target in links:
        os.makedirs(root + os.path.dirname(inside), exist_ok=True)
        os.symlink(target, root + inside)
    binds = []
    for inside, src in dirs:
        os.makedirs(root + inside, exist_ok=True)
        binds.append([src, root + inside, "ro"])
    os.makedirs(root + "/dev/shm")
    for dev in ("null", "zero", "full", "random", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        binds.append([f"/dev/{dev}", f"{root}/dev/{dev}", "dev"])
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/proc")
    os.makedirs(root + SANDBOX_DIR)
    binds.append([work, root + SANDBOX_DIR, "rw"])
    if not os.path.lexists(root + "/tmp"):
        os.symlink(SANDBOX_DIR, root + "/tmp")
    for d, _, files in os.walk(root):  # whatever the trainer's umask, the sandbox uid must traverse the skeleton
        os.chmod(d, 0o755)
        for f in files:
            if not os.path.islink(os.path.join(d, f)):
                os.chmod(os.path.join(d, f), 0o644)
    shm = f"size={limits.file_size_mb}m,nr_inodes=256,mode=1777"
    return {"root": root, "binds": binds, "tmpfs": [[root + "/dev/shm", shm]], "proc": root + "/proc"}


class _Refused(Exception):
    """The host cannot provide the sandbox; the message names what it lacks."""


def _host_refusal() -> str | None:
    if sys.platform != "linux":
        return f"the sandbox needs Linux namespaces, this host runs {sys.platform}"
    if platform.machine() not in _AUDIT_ARCH:
        return f"the sandbox's seccomp filter knows x86_64 and aarch64, this host is {platform.machine()}"
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user namespaces are disabled on this host (sysctl user.max_user_namespaces = 0)"
    except OSError:
        return "this kernel has no user namespaces (/proc/sys/user/max_user_namespaces is missing)"
    return None


def _drain(stream, cap: int, sink: list[bytes], dropped: list[int]) -> None:
    """Read `stream` to EOF, keeping the first `cap` bytes and counting the rest in `dropped[0]`.

    Past the cap the bytes are spliced into /dev/null in the kernel (no copy through Python), so a
    program flooding its output is limited by its CPU time, not by how fast this thread can read."""
    fd = stream.fileno()
    with contextlib.suppress(OSError):  # a 1 MiB pipe: fewer wake-ups
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    kept = 0
    while kept < cap:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        take = chunk[: cap - kept]
        sink.append(take)
        kept += len(take)
        dropped[0] += len(chunk) - len(take)
    with open(os.devnull, "wb") as null:
        while True:
            try:
                n = os.splice(fd, null.fileno(), 1 << 20)
            except OSError:  # no splice here: read and discard
                n = len(os.read(fd, 1 << 20))
            if n == 0:
                return
            dropped[0] += n


def _read_status(fd: int, lines: list[dict], got_init: threading.Event) -> None:
    with os.fdopen(fd, "rb") as f:
        for raw in f:
            if raw.strip():
                msg = json.loads(raw)
                lines.append(msg)
                if "init" in msg:
                    got_init.set()
    got_init.set()


def _last_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run `code` in the sandbox; the result text is its output, a clean error, or a refusal."""
    if not code.strip():
        return error("no code to run")
    why = _host_refusal()
    if why:
        return error(f"{REFUSAL}: {why}; the code was not run")
    base = tempfile.mkdtemp(prefix="flowgrpo-py-")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        main = os.path.join(work, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        root_run = os.geteuid() == 0
        if root_run:
            try:
                for p in (work, main):
                    os.chown(p, SANDBOX_ID, SANDBOX_ID)
            except OSError:  # root of a user namespace without uid 65534: map the trainer's own uid
                root_run = False
        try:
            plan = _build_root(base, work, limits)
        except _Refused as e:
            return error(f"{REFUSAL}: {e}; the code was not run")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": SANDBOX_DIR,
            "TMPDIR": SANDBOX_DIR,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        machine = platform.machine()
        status_r, status_w = os.pipe()
        config = {
            **plan,
            "status_fd": status_w,
            "parent": os.getpid(),
            "clone_flags": _UNSHARE,
            "uid_map": f"{SANDBOX_ID} {SANDBOX_ID if root_run else os.geteuid()} 1",
            "gid_map": f"{SANDBOX_ID} {SANDBOX_ID if root_run else os.getegid()} 1",
            "id": SANDBOX_ID,
            "cwd": SANDBOX_DIR,
            "hostname": "sandbox",
            "syscalls": {k: _nr(k, machine) for k in ("pivot_root", "mount_setattr", "capset")},
            "seccomp": seccomp_program(machine).hex(),
            "argv": [sys.executable, "-I", "-B", "-c", BOOTSTRAP, json.dumps(asdict(limits))],
        }
        cmd = [sys.executable, "-I", "-S", "-B", "-c", LAUNCHER, json.dumps(config)]
        cap = limits.max_output_chars * 4  # bytes; decoded text is truncated to max_output_chars below
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                cmd, cwd=base, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, pass_fds=(status_w,),
            )  # fmt: skip
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        out: list[bytes] = []
        err: list[bytes] = []
        out_dropped, err_dropped = [0], [0]
        status: list[dict] = []
        got_init = threading.Event()
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, cap, out, out_dropped), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, cap, err, err_dropped), daemon=True),
            threading.Thread(target=_read_status, args=(status_r, status, got_init), daemon=True),
        ]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_sandbox(proc, status, got_init)
        proc.wait()
        _kill_group(proc.pid)
        for r in readers:
            r.join()
        wall = time.perf_counter() - t0
        stdout = b"".join(out).decode("utf-8", "replace")
        stderr = b"".join(err).decode("utf-8", "replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    setup_error = next((m["setup_error"] for m in status if "setup_error" in m), None)
    if setup_error is not None:
        return error(f"{REFUSAL}: {setup_error}; the code was not run")
    ws = next((m["status"] for m in status if "status" in m), None)
    if ws is None and not timed_out:
        return error(f"{REFUSAL}: the launcher ended with status {proc.returncode} before running the code")
    rc = proc.returncode if ws is None else os.waitstatus_to_exitcode(ws)
    return _interpret(rc, timed_out, wall, stdout, out_dropped[0], stderr, limits)


def _kill_sandbox(proc: subprocess.Popen, status: list[dict], got_init: threading.Event) -> None:
    """SIGKILL the sandbox's init (the kernel then kills its whole PID namespace), else the launcher's group."""
    got_init.wait(timeout=1.0)
    init = next((m["init"] for m in status if "init" in m), None)
    if init is not None and proc.poll() is None:
        try:
            os.kill(init, signal.SIGKILL)
            proc.wait(timeout=30)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    _kill_group(proc.pid)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _interpret(
    rc: int, timed_out: bool, wall: float, stdout: str, dropped_bytes: int, stderr: str, limits: SandboxLimits
) -> ToolResult:
    shown = stdout
    if len(stdout) > limits.max_output_chars or dropped_bytes:
        shown = stdout[: limits.max_output_chars]
        total = len(stdout.encode("utf-8", "surrogateescape")) + dropped_bytes
        more = total - len(shown.encode("utf-8", "surrogateescape"))
        shown += f"... [truncated {more} more bytes of output]"
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


@functools.cache
def sandbox_refusal() -> str | None:
    """None when this host runs the sandbox (checked once by a real run), else the refusal line."""
    r = run_python("print(1)", SandboxLimits(wall_seconds=30.0))
    return None if r.ok and r.text == "1" else r.text


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
