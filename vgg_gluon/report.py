"""History files and pictures of a run (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from vgg_gluon.fsutil import atomic_write, atomic_write_text

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc",
                  "lr", "seconds", "img_per_s", "eval_img_per_s", "tta"]


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


def selection_split(rows: List[Dict[str, Any]]) -> str:
    """The split "best" is chosen on: "val" when the run held out validation data, else "test"."""
    return "val" if any(isinstance(r.get("val_acc"), float) and not math.isnan(r["val_acc"]) for r in rows) \
        else "test"


def best_row(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The epoch training chose as best: the first with the highest accuracy on the selection split
    (validation when there is some, else test), as engine.fit marks it."""
    key = f"{selection_split(rows)}_acc"
    scored = [r for r in rows if isinstance(r.get(key), float) and not math.isnan(r[key])]
    return max(scored, key=lambda r: (r[key], -r["epoch"])) if scored else None


def best_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Every figure of a run's outcome with its split named, for the end line, --log-json and `runs`."""
    best, split = best_row(rows), selection_split(rows)
    last = rows[-1] if rows else {}
    return {"best_split": split, "best_epoch": best["epoch"] if best else None,
            "best_acc": best.get(f"{split}_acc") if best else None,
            "best_test_acc": best.get("test_acc") if best else None,
            "last_epoch": last.get("epoch"), "last_test_acc": last.get("test_acc")}


def plot_curves(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Loss and accuracy per epoch, train vs test (and validation), learning rate on a third panel."""
    if not rows:
        return
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("test", "-s"), ("val", "--^")):
            ys = [r.get(f"{split}_{key}") for r in rows]
            if any(y is not None and not (isinstance(y, float) and math.isnan(y)) for y in ys):
                ax.plot(ep, [float("nan") if y is None else y for y in ys], style, label=split, ms=3)
        ax.set_title(title)
        ax.legend()
    axes[2].plot(ep, [r.get("lr", float("nan")) for r in rows], "-o", ms=3, color="tab:purple")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_ylim(bottom=0)   # a rate is never negative; a flat or one-point line must not suggest it
    for ax in axes:
        ax.set_xlabel("epoch")
        if ep[-1] - ep[0] < 12:   # 1- and 2-epoch runs: ticks at the epochs, not 1.25, 1.5
            ax.set_xticks(range(ep[0], ep[-1] + 1))
            ax.set_xlim(ep[0] - 0.5, ep[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(path))


# ------------------------------------------------------------------------------------------------
# the visual report: confusion matrix, misclassified images, report.md
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(path), buf.getvalue())


def confusion_matrix(truth, pred, num_classes: int):
    """Counts (true class, predicted class) as an int64 (k, k) numpy array."""
    import numpy as np
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(truth, np.int64), np.asarray(pred, np.int64)), 1)
    return confusion


def normalize_rows(confusion) -> List[List[float]]:
    """Each row (true class) divided by its count; empty rows stay 0."""
    out = []
    for row in confusion:
        total = sum(row)
        out.append([v / total if total else 0.0 for v in row])
    return out


def plot_confusion(path: Path, confusion, classes: List[str]) -> None:
    """Row-normalized confusion matrix (rows: true class, columns: predicted) with class names."""
    plt = _pyplot()
    norm = normalize_rows(confusion)
    k = len(classes)
    side = max(5.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = norm[i][j]
                if v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v > 0.5 else "black")
    total = sum(sum(r) for r in confusion)
    correct = sum(confusion[i][i] for i in range(k))
    ax.set_title(f"confusion matrix (normalized per true class), accuracy {correct / max(total, 1):.4f}")
    fig.tight_layout()
    _save(fig, path)


def plot_mistakes(path: Path, images, truth, pred, probs, classes: List[str], order, limit: int = 32,
                  cols: int = 8) -> None:
    """Grid of misclassified images (uint8 (N, H, W, C)) titled 'true / predicted (probability)'."""
    import numpy as np
    plt = _pyplot()
    order = list(order)[:limit]
    if not order:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        _save(fig, path)
        return
    cols = min(cols, len(order))
    rows = math.ceil(len(order) / cols)
    h, w = images.shape[1:3]
    # One picture: the images in the cells of a white mosaic, each cell's title as text above it
    # (one Axes per image took about a second to lay out and draw, after every run).
    cell_in, title_in, head_in = 1.75, 0.4, 0.45       # cell width, title band, heading (inches)
    gap_x = max(2, w // 5)
    px_per_in = (w + gap_x) / cell_in
    gap_y = int(round(title_in * px_per_in))
    mosaic = np.full((rows * (h + gap_y), cols * (w + gap_x), 3), 255, np.uint8)
    spots = []
    for k, i in enumerate(order):
        r, c = divmod(k, cols)
        y0, x0 = r * (h + gap_y) + gap_y, c * (w + gap_x) + gap_x // 2
        mosaic[y0:y0 + h, x0:x0 + w] = images[i]      # grayscale (H, W, 1) fills all three channels
        spots.append((x0 + w / 2, y0 - 1, i))
    axes_h = mosaic.shape[0] / px_per_in
    fig = plt.figure(figsize=(cell_in * cols, axes_h + head_in))
    ax = fig.add_axes([0, 0, 1, axes_h / (axes_h + head_in)])
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for x, y, i in spots:
        ax.text(x, y, f"true {classes[truth[i]]}\npred {classes[pred[i]]} {probs[i, pred[i]]:.2f}",
                fontsize=7, color="darkred", ha="center", va="bottom")
    fig.suptitle(f"misclassified test images, most confident first ({len(order)} shown)", fontsize=10)
    _save(fig, path)


def write_report_md(path: Path, *, run_name: str, classes: List[str], confusion, history, checkpoint_name: str,
                    epoch, images: List[str], dataset: str, mistakes: int) -> None:
    """Markdown page showing the pictures and the per-class table."""
    k = len(classes)
    total = sum(sum(r) for r in confusion)
    correct = sum(confusion[i][i] for i in range(k))
    lines = [f"# Report: {run_name}", ""]
    lines.append(f"Data set {dataset}, checkpoint `{checkpoint_name}`"
                 + (f" (epoch {epoch})" if epoch is not None else "")
                 + f": test accuracy **{correct / max(total, 1):.4f}** on {total} images (one view each, no "
                 f"test-time augmentation), {mistakes} misclassified.")
    if history:
        b = best_summary(history)
        chosen = ("validation accuracy" if b["best_split"] == "val" else
                  "test accuracy (no --val-split: an optimistic choice; the last epoch's figure is the fair one)")
        tta = history[-1].get("tta")
        with_tta = f" (test-time augmentation {tta})" if isinstance(tta, str) and tta not in ("", "none") else ""
        line = f"Epochs trained: {b['last_epoch']}; last epoch's test accuracy {b['last_test_acc']:.4f}{with_tta}."
        if b["best_epoch"] is not None:
            line += (f" Best epoch {b['best_epoch']}, chosen on {chosen}: {b['best_split']} accuracy "
                     f"{b['best_acc']:.4f}" + (f", test accuracy {b['best_test_acc']:.4f}" if b["best_split"] == "val"
                                               else "") + ".")
        lines.append(line)
    lines.append("")
    titles = {"curves.png": "Loss, accuracy and learning rate per epoch",
              "confusion.png": "Confusion matrix (rows: true class, normalized)",
              "mistakes.png": "Misclassified test images (most confident first)"}
    for name in images:
        lines += [f"## {titles.get(name, name)}", "", f"![{name}]({name})", ""]
    lines += ["## Per-class accuracy", "", "| class | test images | accuracy | most often mistaken for |",
              "|---|---:|---:|---|"]
    for i, name in enumerate(classes):
        n = sum(confusion[i])
        acc = confusion[i][i] / n if n else float("nan")
        others = [(confusion[i][j], j) for j in range(k) if j != i and confusion[i][j]]
        worst = max(others) if others else None
        confused = f"{classes[worst[1]]} ({worst[0] / n:.1%})" if worst else "-"
        lines.append(f"| {name} | {n} | {acc:.4f} | {confused} |")
    if history:
        keys = ["train_loss", "train_acc", "test_loss", "test_acc"]
        keys += ["val_acc"] if selection_split(history) == "val" else []
        heads = [k.replace("_", " ") for k in keys] + ["lr", "seconds"]
        lines += ["", "## Epochs", "", "| epoch | " + " | ".join(heads) + " |", "|---:" * (len(heads) + 1) + "|"]
        for r in history:
            cells = [f"{float(r.get(k, float('nan'))):.4f}" for k in keys]
            cells += [f"{float(r.get('lr', float('nan'))):.4g}", f"{float(r.get('seconds', float('nan'))):.1f}"]
            lines.append(f"| {r['epoch']} | " + " | ".join(cells) + " |")
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
