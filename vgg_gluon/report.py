"""History files and pictures of a run (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List

from vgg_gluon.checkpoint import atomic_write, atomic_write_text

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc",
                  "lr", "seconds", "img_per_s", "eval_img_per_s"]


def write_history(path: Path, rows: List[Dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in HISTORY_FIELDS})
    atomic_write_text(Path(path), buf.getvalue())


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_history(path: Path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row: Dict[str, Any] = {}
            for k, v in r.items():
                if v in (None, ""):
                    continue
                try:
                    row[k] = int(v) if k == "epoch" else float(v)
                except ValueError:
                    row[k] = v
            if "epoch" in row:
                rows.append(row)
    return rows


def plot_curves(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Loss and accuracy per epoch, train vs test (and validation), learning rate on a third panel."""
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("test", "-s"), ("val", "--^")):
            ys = [r.get(f"{split}_{key}") for r in rows]
            if any(y is not None and not (isinstance(y, float) and math.isnan(y)) for y in ys):
                ax.plot(ep, [float("nan") if y is None else y for y in ys], style, label=split, ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(ep, [r.get("lr", float("nan")) for r in rows], "-o", ms=3, color="tab:purple")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())
