"""Training curves from a run's metrics.jsonl as a PNG.

    python -m bench.curves RUN_DIR OUT.png [--title TEXT]

Left panel: success rate per step (one point per step: the share of the step's B·G trajectories
with reward 1) and its moving average over `window` steps; right panel: the policy's mean
entropy (over response tokens) and the zero-variance share of groups (groups that give no
gradient). The x axis is the step; the wall-clock time of the run is written next to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.metrics import read_metrics


def moving_average(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_training_curve(run_dir: str | Path, out: str | Path, *, title: str = "", window: int = 5) -> Path:
    """Write the curve of `run_dir/metrics.jsonl` to `out` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no complete lines to plot")
    steps = [r["step"] for r in rows]
    success = [r["reward/success_rate"] for r in rows]
    entropy = [r.get("actor/entropy") for r in rows]
    zero_var = [r.get("adv/zero_var_group_frac") for r in rows]
    wall = rows[-1].get("time/elapsed_s")

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, success, "o", ms=3, alpha=0.5, label="success rate (per step)")
    a.plot(steps, moving_average(success, window), "-", lw=2, label=f"moving average ({window} steps)")
    a.set_ylim(0, 1.02)
    a.set_xlabel("step" + (f"   (run wall time {wall / 60:.1f} min)" if wall else ""))
    a.set_ylabel("success rate")
    a.grid(alpha=0.3)
    a.legend(loc="lower right")
    b.plot(steps, entropy, "-", label="policy entropy (nats)")
    b.plot(steps, zero_var, "-", label="zero-variance groups (share)")
    b.set_xlabel("step")
    b.grid(alpha=0.3)
    b.legend(loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="plot a run's success-rate curve from metrics.jsonl")
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--title", default="")
    ap.add_argument("--window", type=int, default=5)
    args = ap.parse_args(argv)
    print(plot_training_curve(args.run_dir, args.out, title=args.title, window=args.window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
