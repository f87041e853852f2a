"""Time to accuracy (issue 10): train recipes with the real CLI, one run per seed, and report when
each run's TEST accuracy first reached each target, counting TRAINING wall time only (the
per-epoch `seconds` the engine measures: data pipeline, forward, backward, update, metrics; not
the evaluation or checkpoint after each epoch). Accuracy is whatever the run's per-epoch
evaluation printed (its `tta` column says whether test-time augmentation was used).

    # train and tabulate (defaults: the data set's targets, seed 0)
    python benchmarks/tta.py --config experiments/cifar10_fast3.yaml --seeds 0,1,2
    # no arguments: experiments/fashion_mnist.yaml (`make train`'s recipe), seed 0 (3-5 minutes)
    # tabulate runs that already finished (their history.csv), no training
    python benchmarks/tta.py --runs checkpoints/run-a checkpoints/run-b
    # the tutorials' reference row: time one short epoch at 224 px, extrapolate
    python benchmarks/tta.py --reference

Targets: 90/92/93/94% on CIFAR-10, 92/93/94/95% on Fashion-MNIST (`--targets` overrides).
The exit status is 0 when every run finished; reaching a target is the table's business.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from vgg_gluon.config import load_yaml
from vgg_gluon.report import read_history

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"cifar10": (0.90, 0.92, 0.93, 0.94), "fashion-mnist": (0.92, 0.93, 0.94, 0.95)}
# The tutorial (../shared/seeds, d2l's PyTorch VGG-11 at 1/4 width, Fashion-MNIST at 224 px, lr
# 0.05, batch 128) printed these test accuracies after epochs 1..5 on its GPU.
TUTORIAL_TEST_ACC = (0.877, 0.892, 0.908, 0.914, 0.913)


def read_run(run: Path) -> Dict:
    """Per-epoch (cumulative training seconds, test accuracy) of a finished or stopped run."""
    cfg = load_yaml(run / "config.yaml") if (run / "config.yaml").exists() else {}
    cum, epochs = 0.0, []
    for r in read_history(run / "history.csv"):
        cum += r["seconds"]
        epochs.append({"epoch": r["epoch"], "train_s": cum, "test_acc": r["test_acc"],
                       "tta": r.get("tta", "none"), "img_per_s": r["img_per_s"]})
    return {"run": str(run), "dataset": cfg.get("dataset", "?"), "seed": cfg.get("seed", "?"),
            "epochs_planned": int(cfg.get("epochs") or len(epochs)), "epochs": epochs}


def time_to(epochs: List[Dict], target: float) -> Optional[float]:
    return next((e["train_s"] for e in epochs if e["test_acc"] >= target), None)


def fmt_min(s: Optional[float]) -> str:
    return "not reached" if s is None else f"{s / 60:.1f} min"


def table(runs: List[Dict], targets) -> str:
    head = "| run | seed | epochs | last-epoch test acc | TTA | training | " + \
           " | ".join(f"to {t:.0%}" for t in targets) + " |"
    lines = [head, "|" + "---|" * (6 + len(targets))]
    for r in runs:
        e = r["epochs"]
        last = e[-1] if e else None
        done = f"{len(e)}/{r['epochs_planned']}"
        lines.append(f"| {Path(r['run']).name} | {r['seed']} | {done} | "
                     f"{(last['test_acc'] * 100 if last else float('nan')):.2f}% | "
                     f"{last['tta'] if last else '-'} | {fmt_min(last['train_s'] if last else None)} | " +
                     " | ".join(fmt_min(time_to(e, t)) for t in targets) + " |")
    finals = [r["epochs"][-1]["test_acc"] for r in runs if r["epochs"] and len(r["epochs"]) == r["epochs_planned"]]
    if len(finals) >= 2:
        lines.append(f"\nlast-epoch test accuracy over {len(finals)} finished runs: "
                     f"{statistics.mean(finals) * 100:.2f} +- {statistics.stdev(finals) * 100:.2f}% "
                     f"(mean +- sample std)")
    return "\n".join(lines)


def train(python: str, config: str, seed: int, out_dir: Path, extra: List[str]) -> Path:
    name = f"tta-{Path(config).stem}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [python, "-m", "vgg_gluon", "train", "--config", config, "--seed", str(seed),
           "--output-dir", str(out_dir), "--name", name, "--quiet", *extra]
    print("$", " ".join(cmd), flush=True)
    load0 = os.getloadavg()
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"exit {rc}; load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after", flush=True)
    if rc:
        raise SystemExit(f"training failed (exit {rc}): {' '.join(cmd)}")
    return out_dir / name


def reference(python: str, out_dir: Path, images: int) -> str:
    """The tutorial's recipe (experiments/d2l_vgg11_224.yaml): time `images` training images for
    one epoch here, extrapolate to 60,000 per epoch, pair with the tutorial's printed accuracies."""
    run = out_dir / f"tta-reference-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [python, "-m", "vgg_gluon", "train", "--config", "experiments/d2l_vgg11_224.yaml", "--epochs", "1",
           "--train-limit", str(images), "--test-limit", "256", "--output-dir", str(out_dir),
           "--name", run.name, "--quiet"]
    print("$", " ".join(cmd), flush=True)
    if subprocess.call(cmd, cwd=ROOT):
        raise SystemExit("the reference run failed")
    img_s = read_history(run / "history.csv")[0]["img_per_s"]
    epoch_s = 60000 / img_s
    cum = [epoch_s * (i + 1) for i in range(len(TUTORIAL_TEST_ACC))]
    cells = [fmt_min(next((c for c, a in zip(cum, TUTORIAL_TEST_ACC) if a >= t), None))
             for t in TARGETS["fashion-mnist"]]
    return (f"reference (tutorial recipe, VGG-11 x0.25 no BN, 224 px, 5 epochs): {img_s:.1f} img/s measured "
            f"on {images} images -> {epoch_s / 60:.1f} min per 60,000-image epoch (EXTRAPOLATED); accuracy: "
            f"the tutorial's printed test accuracies {TUTORIAL_TEST_ACC} (NOT measured here)\n"
            f"| reference | - | 5 | {TUTORIAL_TEST_ACC[-1] * 100:.2f}% | none | {fmt_min(cum[-1])} | "
            + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", help="recipe to train (repeatable)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    ap.add_argument("--runs", nargs="*", default=[], help="finished run folders to tabulate")
    ap.add_argument("--targets", help="comma-separated accuracies (default: the data set's)")
    ap.add_argument("--reference", action="store_true", help="add the tutorial recipe's row")
    ap.add_argument("--reference-images", type=int, default=2048)
    ap.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "runs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    # The project's own environment (what `make train` uses), not the benchmark venv: that one
    # also holds torch 2.x, next to which gluoncv refuses to import.
    own = ROOT / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(own) if own.exists() else sys.executable)
    ap.add_argument("extra", nargs="*", help="more flags for `vgg-gluon train` (after --)")
    args = ap.parse_args()
    if not (args.config or args.runs or args.reference):
        args.config = ["experiments/fashion_mnist.yaml"]   # `make train`'s recipe (3-5 minutes)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average {os.getloadavg()}", flush=True)
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
        print("cpu flags (avx*/fma):", " ".join(f for f in flags.split()[2:] if f.startswith(("avx", "fma"))))
    except (OSError, StopIteration):
        pass
    runs = [Path(r) for r in args.runs]
    for config in args.config or []:
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            runs.append(train(args.python, config, seed, out_dir, args.extra))
    data = [read_run(r) for r in runs]
    report = []
    for ds in sorted({d["dataset"] for d in data}):
        targets = tuple(float(t) for t in args.targets.split(",")) if args.targets else TARGETS.get(ds, (0.9,))
        report.append(f"## {ds}\n\n" + table([d for d in data if d["dataset"] == ds], targets))
    if args.reference:
        report.append("## fashion-mnist reference\n\n" + reference(args.python, out_dir, args.reference_images))
    text = "\n\n".join(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"time-to-accuracy-{stamp}.md").write_text(text + "\n")
    (out / f"time-to-accuracy-{stamp}.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
