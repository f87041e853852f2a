"""Peak RSS of the default training run, and a check that memory does not grow after epoch 2.

Runs `vgg-gluon train --config experiments/fashion_mnist.yaml --epochs N` (the real CLI) in a
subprocess, samples its VmRSS/VmHWM from /proc every 0.25 s, and notes the RSS each time an
epoch's row lands in history.csv. Fails (exit 1) when the RSS at the end of epoch N exceeds that
at the end of epoch 2 by more than --tolerance-mb.

    python benchmarks/memory.py [--epochs 4] [--tolerance-mb 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) / 1024  # MiB
    except OSError:
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/fashion_mnist.yaml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--tolerance-mb", type=float, default=32.0)
    ap.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results" / "runs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    # The project's own environment (what `make train` uses), not the benchmark venv: that one
    # also holds torch 2.x, next to which gluoncv refuses to import.
    own = ROOT / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(own) if own.exists() else sys.executable)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    if args.epochs < 3:
        ap.error("--epochs must be at least 3 (growth is measured from epoch 2 to N)")
    name = f"memory-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [args.python, "-m", "vgg_gluon", "train", "--config", args.config, "--epochs", str(args.epochs),
           "--output-dir", args.output_dir, "--name", name, "--quiet", *args.extra]
    print("$", " ".join(cmd), flush=True)
    hist = Path(args.output_dir) / name / "history.csv"
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT)
    samples, at_epoch, seen = [], {}, 0
    while p.poll() is None:
        st = _status(p.pid)
        if st:
            samples.append((time.time() - t0, st.get("VmRSS", 0.0), st.get("VmHWM", 0.0)))
        try:
            rows = max(0, len(hist.read_text().splitlines()) - 1)
        except OSError:
            rows = 0
        if rows > seen and st:
            seen = rows
            at_epoch[rows] = st["VmRSS"]
            print(f"after epoch {rows}: RSS {st['VmRSS']:.0f} MiB (peak so far {st['VmHWM']:.0f} MiB)", flush=True)
        time.sleep(0.25)
    rc = p.returncode
    peak = max((s[2] for s in samples), default=float("nan"))
    n = args.epochs
    growth = at_epoch.get(n, float("nan")) - at_epoch.get(2, float("nan"))
    ok = rc == 0 and 2 in at_epoch and n in at_epoch and growth <= args.tolerance_mb
    print(f"peak RSS {peak:.0f} MiB; RSS after epoch 2 {at_epoch.get(2, float('nan')):.0f} MiB, after epoch {n} "
          f"{at_epoch.get(n, float('nan')):.0f} MiB: growth {growth:+.1f} MiB "
          f"({'OK' if ok else 'FAIL'}, tolerance {args.tolerance_mb:g} MiB); exit {rc}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({
        "command": " ".join(cmd), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "peak_rss_mib": peak,
        "rss_after_epoch_mib": at_epoch, "growth_mib": growth, "ok": ok, "load": os.getloadavg(),
        "samples": samples[::4]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
