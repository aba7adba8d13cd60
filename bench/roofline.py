"""The roofline of this device, measured in the same run as the kernels it judges.

Three figures, each the median of `repeats` timed calls after `warmup` untimed ones (`bench.harness`):

    copy GB/s       `dst.copy_(src)` of a large buffer; bytes = 2 × size (read + write). On CUDA
                    1 GiB device-to-device, the practical DRAM bandwidth (HBM3 on an H100 SXM: the
                    spec says 3.35 TB/s, a copy reaches ~2.6–3.0); on CPU 256 MiB host memory.
    matmul TFLOP/s  `a @ b` of square matrices in the benchmark's dtype; FLOP = 2·n³. On CUDA
                    n = 8192 (bf16 on tensor cores), on CPU n = 1024.
    H2D GB/s        CUDA only: a 1 GiB pinned host buffer copied to the device (the PCIe/NVLink-C2C
                    path that offload and weight sync use); None elsewhere.

A kernel's "% of roofline" is its GB/s over copy GB/s (memory-bound logits ops) or its TFLOP/s over
matmul TFLOP/s (the LM-head ops, which are matmul-bound). The measured roofline, not a spec sheet,
is the ceiling: a kernel at 90% of it has little left to gain from memory traffic alone.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.harness import time_call


@dataclass
class Roofline:
    device: str
    dtype: str
    copy_bytes: int
    copy_gbps: float
    matmul_n: int
    matmul_tflops: float
    h2d_bytes: int | None = None
    h2d_gbps: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        h2d = f", pinned H2D {self.h2d_gbps:.1f} GB/s" if self.h2d_gbps is not None else ""
        return (
            f"# roofline (measured now): copy {self.copy_gbps:.1f} GB/s ({self.copy_bytes >> 20} MiB), "
            f"{self.dtype} matmul {self.matmul_tflops:.2f} TFLOP/s (n={self.matmul_n}){h2d}"
        )


def _median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    return statistics.median(time_call(fn, device=device, warmup=warmup, repeats=repeats))


def copy_gbps(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (_median_ms(lambda: dst.copy_(src), device, warmup, repeats) * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / (_median_ms(lambda: a @ b, device, warmup, repeats) * 1e-3) / 1e12


def h2d_gbps(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / (_median_ms(lambda: dev.copy_(host, non_blocking=True), device, warmup, repeats) * 1e-3) / 1e9


def measure(
    device: torch.device,
    dtype: torch.dtype,
    *,
    copy_bytes: int | None = None,
    matmul_n: int | None = None,
    warmup: int = 2,
    repeats: int = 10,
) -> Roofline:
    """Measure copy bandwidth, matmul throughput and (CUDA) pinned host-to-device bandwidth."""
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if cuda else 256 << 20)
    matmul_n = matmul_n or (8192 if cuda else 1024)
    h2d_bytes = (1 << 30) if cuda else None
    roof = Roofline(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        copy_bytes=copy_bytes,
        copy_gbps=copy_gbps(device, copy_bytes, warmup, repeats),
        matmul_n=matmul_n,
        matmul_tflops=matmul_tflops(device, dtype, matmul_n, warmup, repeats),
        h2d_bytes=h2d_bytes,
        h2d_gbps=None if h2d_bytes is None else h2d_gbps(device, h2d_bytes, warmup, repeats),
    )
    if cuda:
        torch.cuda.empty_cache()
    return roof
