"""What a training run shows: the progress bar, the epoch lines (also in RUN/train.log), JSON
lines (--log-json), TensorBoard files (--tensorboard), the closing lines, and the stop flag that
Ctrl-C and SIGTERM set."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import click


class Console:
    """Progress bar on a terminal, epoch lines on stdout and in RUN/train.log."""

    def __init__(self, quiet: bool, log_path: Optional[Path] = None, silent: bool = False):
        self.quiet = quiet
        self.silent = silent   # a distributed worker other than rank 0: prints nothing at all
        self.log_path = log_path
        self.bar = None
        self.use_bar = not quiet and sys.stderr.isatty()
        # --log-json of the running command (train/resume): JSON lines for machines. A Console
        # without a train.log (e.g. a non-writing distributed rank) writes none.
        ctx = click.get_current_context(silent=True)
        self.json_path = ctx.params.get("log_json") if ctx is not None and log_path is not None else None
        self.tb = None   # --tensorboard DIR: the same readings as TensorBoard scalars
        tb_dir = ctx.params.get("tensorboard") if ctx is not None and log_path is not None else None
        if tb_dir:
            from vgg_gluon.tensorboard import TensorBoardLog
            self.tb = TensorBoardLog(Path(tb_dir))
        self._epoch_t = time.time()  # wall time per epoch (training + evaluation + save) for the ETA
        self._epoch_walls: list = []

    def record(self, event: str, **fields: Any) -> None:
        """One JSON line (--log-json): {"event": "epoch", "epoch": 3, "test_acc": ..., ...}."""
        if not self.json_path:
            return
        clean = {k: (None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v)
                 for k, v in fields.items()}
        text = json.dumps({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **clean})
        if self.json_path == "-":
            self.close_bar()
            click.echo(text)
        else:
            with open(self.json_path, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def epoch(self, row: Dict[str, Any], epochs: int, is_best: bool) -> None:
        """The epoch line plus the run's ETA (mean wall time of the epochs seen x epochs left)."""
        now = time.time()
        self._epoch_walls.append(now - self._epoch_t)
        self._epoch_t = now
        left = epochs - int(row["epoch"])
        eta = sum(self._epoch_walls) / len(self._epoch_walls) * left if left > 0 else 0.0
        self.line(epoch_line(row, epochs, is_best) + (f"  eta {_duration(eta)}" if left > 0 else ""))
        if self.tb is not None:
            self.tb.epoch(row)
        self.record("epoch", **row, epochs=epochs, best=bool(is_best), eta_seconds=round(eta, 1))

    def line(self, text: str, err: bool = False) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
        if not self.silent and (not self.quiet or err):
            self.close_bar()
            click.echo(text, err=err or self.json_path == "-")

    def progress(self, p) -> None:
        if self.tb is not None:
            self.tb.progress(p)
        if not self.use_bar:
            return
        if self.bar is None or self.bar.desc != f"epoch {p.epoch}":
            from tqdm import tqdm
            self.close_bar()
            # initial: the bar starts at the first reading, so rate and ETA count only what it saw.
            self.bar = tqdm(total=p.steps, desc=f"epoch {p.epoch}", unit="step", leave=False,
                            dynamic_ncols=True, file=sys.stderr, initial=p.step)
        self.bar.update(p.step - self.bar.n)
        self.bar.set_postfix_str(f"loss {p.loss:.4f} acc {p.acc:.4f} {p.img_per_s:,.0f} img/s lr {p.lr:.4g}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 9 -> '9s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epoch_line(row: Dict[str, Any], epochs: int, is_best: bool) -> str:
    tta = f" (TTA {row['tta']})" if row.get("tta") else ""
    s = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
         f"test{tta} loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")
    if "val_acc" in row:
        s += f"  val acc {row['val_acc']:.4f}"
    s += f"  {row['seconds']:.1f}s {row['img_per_s']:,.0f} img/s  lr {row['lr']:.4g}"
    return s + ("  *best" if is_best else "")


def done_line(o: Dict[str, Any], tta: str = "none") -> str:
    """The last line of a finished run: every figure names its split (and the TTA, if any)."""
    t = f" (TTA {tta})" if tta and tta != "none" else ""
    text = f"done: last epoch ({o['last_epoch']}) test accuracy{t} {o['last_test_acc']:.4f}"
    if o["best_epoch"] is None:
        return text
    if o["best_split"] == "val":
        return text + (f"; best epoch {o['best_epoch']} by validation accuracy{t} {o['best_acc']:.4f} "
                       f"(test accuracy {o['best_test_acc']:.4f})")
    return text + f"; best epoch {o['best_epoch']} by test accuracy{t} {o['best_acc']:.4f} (chosen on the test set)"


def resume_hint(run_dir: Path, dist=None) -> str:
    """The command that continues a stopped run: a distributed one goes back through the launcher
    (a bare `resume` of a dist_* run has no parameter server to join)."""
    if dist is None:
        return f"Continue with `vgg-gluon resume {run_dir}`"
    servers = os.environ.get("DMLC_NUM_SERVER", "1")
    launch = f"vgg-gluon launch -n {dist.num_workers}" + (f" -s {servers}" if servers != "1" else "")
    return (f"Continue with `{launch} -- resume {run_dir}` "
            f"(or in one process: `vgg-gluon resume {run_dir} --kvstore device`)")


class StopFlag:
    """SIGINT/SIGTERM set a flag the training loop checks after every step; a second signal
    while the checkpoint is being written is ignored so the save completes."""

    def __init__(self, console: Console):
        self.signum: Optional[int] = None
        self.console = console
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            self.console.line(f"{name}: finishing this step and saving a checkpoint...", err=True)
        else:
            self.console.line("still saving the checkpoint, please wait", err=True)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
