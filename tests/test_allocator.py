"""The CUDA VMM allocator: it compiles (default lane, no GPU needed), loads, reports why it cannot run
without a driver, and (gpu lane) pauses and resumes tagged regions: NVML sees the memory go and come
back, contents come back bit for bit at the same addresses, an optimizer living there trains on.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from engine.allocator import (
    ABI_VERSION,
    EXPORTED,
    LIB_NAME,
    AllocatorUnavailable,
    VMMAllocator,
    load_library,
    move_optimizer_state_to_region,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_lib(tmp_path_factory) -> Path:
    """Configure and build engine/csrc with CMake into a temporary directory (-Wall -Wextra -Werror)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("vmm")
    build, lib_dir = root / "build", root / "lib"
    cfg = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), f"-DFLOWGRPO_LIB_DIR={lib_dir}", "-DCMAKE_BUILD_TYPE=Release"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    if "no CUDA toolkit found" in cfg.stdout:
        pytest.skip("no CUDA toolkit: CMake builds nothing here (its headers are needed to compile engine/csrc)")
    out = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    lib = lib_dir / LIB_NAME
    assert lib.is_file(), out.stdout
    return lib


def test_allocator_compiles_and_exports_its_c_interface(built_lib):
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, "-D", "--defined-only", str(built_lib)], capture_output=True, text=True).stdout
        defined = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
        assert set(EXPORTED) <= defined, set(EXPORTED) - defined
    deps = subprocess.run(["ldd", str(built_lib)], capture_output=True, text=True).stdout if shutil.which("ldd") else ""
    assert "libcuda" not in deps and "libcudart" not in deps, "the driver must be resolved at run time (dlopen)"


def test_library_loads_without_a_gpu_and_keeps_its_tag(built_lib):
    lib = load_library(built_lib)
    assert lib.flowgrpo_vmm_abi_version() == ABI_VERSION
    buf = ctypes.create_string_buffer(64)
    assert lib.flowgrpo_vmm_get_tag(buf, 64) == len("default") and buf.value == b"default"
    assert lib.flowgrpo_vmm_set_tag(b"optimizer") == 0
    lib.flowgrpo_vmm_get_tag(buf, 64)
    assert buf.value == b"optimizer"
    assert lib.flowgrpo_vmm_set_tag(b"") == -1 and b"non-empty" in lib.flowgrpo_vmm_last_error()
    assert lib.flowgrpo_vmm_set_tag(b"default") == 0
    assert lib.flowgrpo_vmm_allocations(None, None, 0) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-driver path")
def test_without_a_driver_init_says_why_and_the_wrapper_refuses(built_lib):
    lib = load_library(built_lib)
    if lib.flowgrpo_vmm_init() == 0:
        pytest.skip("a CUDA driver is installed on this machine even though torch sees no GPU")
    message = lib.flowgrpo_vmm_last_error().decode()
    assert "libcuda" in message or "cuInit" in message, message
    with pytest.raises(AllocatorUnavailable, match="needs a CUDA device"):
        VMMAllocator(built_lib)


def test_missing_library_tells_how_to_build_it(tmp_path):
    with pytest.raises(AllocatorUnavailable, match="make build"):
        load_library(tmp_path / LIB_NAME)


# ---- gpu lane -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vmm(built_lib):
    return VMMAllocator.get(built_lib)


def _nvml_used() -> int:
    from engine.device_memory import nvml

    used = nvml().used(torch.cuda.current_device())
    if used is None:
        pytest.skip(f"NVML unavailable: {nvml().reason}")
    return used[0]


MiB = 1 << 20


@pytest.mark.gpu
def test_pause_releases_memory_and_resume_restores_it_bit_for_bit(vmm):
    n = 512 * MiB // 4
    with vmm.region("pause-test"):
        x = torch.randn(n, device="cuda")
        small = torch.arange(1001, device="cuda", dtype=torch.int64)
    ref, ref_small = x.cpu().view(torch.int32).clone(), small.cpu().clone()
    ptr, ptr_small = x.data_ptr(), small.data_ptr()
    stats = vmm.stats("pause-test")
    assert stats.mapped_bytes >= 512 * MiB and stats.paused_bytes == 0
    torch.cuda.synchronize()
    used_before = _nvml_used()

    released = vmm.pause("pause-test", backup=True)
    used_paused = _nvml_used()
    assert released == stats.mapped_bytes
    assert vmm.stats("pause-test").mapped_bytes == 0 and vmm.stats("pause-test").host_backup_bytes >= 512 * MiB
    # The device gives the physical memory back (NVML granularity is coarse: allow 64 MiB either way).
    assert abs((used_before - used_paused) - released) <= 64 * MiB, (used_before, used_paused, released)
    with pytest.raises(RuntimeError, match="paused"), vmm.region("pause-test"):
        pass

    mapped = vmm.resume("pause-test")
    assert mapped == released
    assert abs(_nvml_used() - used_before) <= 64 * MiB
    assert x.data_ptr() == ptr and small.data_ptr() == ptr_small
    assert torch.equal(x.cpu().view(torch.int32), ref) and torch.equal(small.cpu(), ref_small)
    assert torch.equal((x * 2).cpu(), ref.view(torch.float32) * 2)  # kernels read the remapped pages
    assert vmm.stats("pause-test").host_backup_bytes == 0


@pytest.mark.gpu
def test_pause_without_backup_keeps_the_addresses_usable(vmm):
    with vmm.region("scratch"):
        x = torch.ones(64 * MiB // 4, device="cuda")
    ptr = x.data_ptr()
    assert vmm.pause("scratch", backup=False) > 0
    assert vmm.stats("scratch").host_backup_bytes == 0
    vmm.resume("scratch")
    assert x.data_ptr() == ptr
    x.fill_(3.0)
    assert bool((x == 3.0).all())


@pytest.mark.gpu
def test_regions_are_separate(vmm):
    with vmm.region("left"):
        a = torch.full((8 * MiB,), 1.0, device="cuda")
    with vmm.region("right"):
        b = torch.full((8 * MiB,), 2.0, device="cuda")
    vmm.pause("left")
    assert vmm.stats("right").mapped_bytes > 0 and vmm.stats("left").mapped_bytes == 0
    assert bool((b == 2.0).all())  # the other region stays usable
    vmm.resume("left")
    assert bool((a == 1.0).all())
    assert vmm.current_tag() == "default"


@pytest.mark.gpu
def test_optimizer_state_in_a_region_round_trips_and_training_continues_identically(vmm):
    import copy

    from engine.device_memory import DeviceMemoryManager, RegionOffloader

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)

    def step(i):
        gen = torch.Generator().manual_seed(i)
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for m, o in ((model, opt), (twin, twin_opt)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.cuda()
            o.step()

    step(0)
    moved = move_optimizer_state_to_region(opt, vmm, "optimizer")
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_cuda]
    ids, ptrs = [id(v) for v in state], [v.data_ptr() for v in state]
    assert moved == sum(v.numel() * v.element_size() for v in state)
    assert vmm.stats("optimizer").mapped_bytes >= moved

    mm = DeviceMemoryManager(offloader=RegionOffloader(vmm, "optimizer"))
    for i in range(1, 4):
        used = _nvml_used()
        rec = mm.to_rollout()[0]
        assert rec["move"].released_bytes >= moved
        assert used - rec["memory"]["nvml_used"] >= moved - 64 * MiB
        mm.to_train()
        step(i)
    now = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_cuda]
    assert [id(v) for v in now] == ids and [v.data_ptr() for v in now] == ptrs, "no re-allocation, no re-binding"
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
