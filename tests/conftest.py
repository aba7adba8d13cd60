"""Test lanes, NaN-poisoned kernel outputs, and shared fixtures.

Lanes (markers): default; `interpreter` (Triton kernels: interpreted with TRITON_INTERPRET=1 on a
machine without CUDA, compiled on one with it); `gpu` (skipped without CUDA); `slow` (not run by
`make test`). TRITON_INTERPRET must be set before any `@triton.jit` is decorated, so it is set here,
before the test modules import `kernels`.
"""

from __future__ import annotations

import os

# The interpreter runs each tl.dot as a numpy matmul; on a busy 2-core machine OpenBLAS's threads wait
# more than they multiply (an interpreter test of 257×96×5003 logits: 17 s with its threads, 3 s with
# one). It must be set before numpy is loaded (importing torch loads it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from kernels.utils import poisoned_outputs  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every tensor a kernel wrapper allocates for its outputs starts as NaN (integers as -1)."""
    with poisoned_outputs(float("nan")):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Qwen2 model + tokenizer built locally once per session (float32, head_dim 64)."""
    from engine.tiny import TinyConfig, make_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny(out, TinyConfig())
    return str(out)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
