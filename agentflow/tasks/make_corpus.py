"""Regenerate the shipped search corpus: `python -m agentflow.tasks.make_corpus [--out FILE]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from agentflow.tasks.world import CORPUS_PATH, corpus_lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="regenerate the search corpus from the fictional world (deterministic)")
    ap.add_argument("--out", default=str(CORPUS_PATH))
    args = ap.parse_args(argv)
    lines = corpus_lines()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {len(lines)} passages ({out.stat().st_size} bytes) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
