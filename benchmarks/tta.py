"""Time to accuracy: train a recipe with the real CLI and report when test accuracy first reached
the target, counting TRAINING wall time only (the per-epoch `seconds` the engine measures:
data pipeline, forward, backward, update, metrics; not the evaluation or checkpoint after each
epoch). The whole command's wall time is reported too.

    python benchmarks/tta.py [--config experiments/fashion_mnist_fast.yaml] [--target 0.913] [--budget 150]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/fashion_mnist_fast.yaml")
    ap.add_argument("--target", type=float, default=0.913)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds of training wall time")
    ap.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "runs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    # The project's own environment (what `make train` uses), not the benchmark venv: that one
    # also holds torch 2.x, next to which gluoncv refuses to import.
    own = ROOT / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(own) if own.exists() else sys.executable)
    ap.add_argument("extra", nargs="*", help="more flags for `vgg-gluon train`")
    args = ap.parse_args()
    name = f"tta-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    load0 = os.getloadavg()
    cmd = [args.python, "-m", "vgg_gluon", "train", "--config", args.config, "--output-dir",
           args.output_dir, "--name", name, "--quiet", *args.extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - t0
    load1 = os.getloadavg()
    hist = Path(args.output_dir) / name / "history.csv"
    rows = list(csv.DictReader(hist.open())) if hist.exists() else []
    train_s, reached = 0.0, None
    table = []
    for r in rows:
        train_s += float(r["seconds"])
        acc = float(r["test_acc"])
        table.append({"epoch": int(r["epoch"]), "train_seconds_cum": train_s, "test_acc": acc,
                      "img_per_s": float(r["img_per_s"])})
        if reached is None and acc >= args.target:
            reached = table[-1]
        print(f"epoch {r['epoch']:>2}: test acc {acc:.4f}  training time so far {train_s:6.1f} s  "
              f"({float(r['img_per_s']):.0f} img/s)")
    best = max((t["test_acc"] for t in table), default=float("nan"))
    if reached:
        verdict = (f"reached {args.target:.1%} at epoch {reached['epoch']} after {reached['train_seconds_cum']:.1f} s "
                   f"of training ({'within' if reached['train_seconds_cum'] <= args.budget else 'OVER'} "
                   f"the {args.budget:.0f} s budget)")
    else:
        verdict = f"did NOT reach {args.target:.1%}: best {best:.4f} after {train_s:.1f} s of training"
    print(f"{verdict}; whole command {wall:.1f} s; load average {load0[0]:.2f} before, {load1[0]:.2f} after; exit {rc}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({
        "command": " ".join(cmd), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "exit": rc,
        "epochs": table, "reached": reached, "target": args.target, "budget_s": args.budget,
        "wall_s": wall, "load_before": load0, "load_after": load1}, indent=1))
    return 0 if rc == 0 and reached and reached["train_seconds_cum"] <= args.budget else 1


if __name__ == "__main__":
    sys.exit(main())
