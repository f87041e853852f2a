"""`vgg-gluon runs`: what is in the checkpoints folder, read from the files alone (no MXNet).

State of a run, derived from its files:

* finished -- the last checkpoint ends the planned last epoch;
* stopped  -- the last checkpoint is a mid-epoch one (Ctrl-C / SIGTERM), or train.log ends with a
  "stopped ..." line;
* running  -- none of the above and the training process named in ``RUN/.running.json`` is alive
  (for a run trained on another host: a file changed in the last 10 minutes);
* crashed  -- none of the above: the training process died (killed, out of memory, an error: the
  error is the last line of train.log), an interrupted save (a ``.tmp-`` leftover), a NaN stop, or
  no clean end at all.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from vgg_gluon import report
from vgg_gluon.checkpoint import MARKER, list_checkpoints
from vgg_gluon.fsutil import TMP_PREFIX, atomic_write_text

log = logging.getLogger(__name__)

#: Without a usable marker, a run whose files changed this recently counts as running.
RUNNING_WINDOW_S = 600
# MARKER (RUN/.running.json): written by training while it runs (pid and host), removed when it ends
# in any way but a kill.


class RunMarker:
    """Context manager around training: RUN/.running.json while the process trains. If training
    raises, the error is appended to train.log (so `runs` and a reader of the log see why it ended).
    Never raises itself."""

    def __init__(self, run_dir: Path, active: bool = True):
        self.path = Path(run_dir) / MARKER
        self.active = active

    def __enter__(self) -> "RunMarker":
        if self.active:
            try:
                atomic_write_text(self.path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            except OSError as exc:
                log.debug("cannot write %s: %s", self.path, exc)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            try:
                with open(self.path.parent / "train.log", "a", encoding="utf-8") as f:
                    f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + f"Error: training crashed: "
                            f"{type(exc).__name__}: {first}\n")
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
        return False


def _pid_alive(pid: int) -> bool:
    """Is `pid` a live process of this host that looks like vgg-gluon (guards against pid reuse)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return False
    try:
        return b"vgg" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc (not Linux) or not readable: the pid exists, trust it
        return True


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _read_config(run_dir: Path) -> Dict[str, Any]:
    import yaml
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return {}


def _last_log_line(run_dir: Path) -> str:
    try:
        with open(run_dir / "train.log", "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("config.yaml", "last.json", "history.csv"))


def describe_run(run_dir: Path, now: Optional[float] = None) -> Dict[str, Any]:
    """One row of `vgg-gluon runs` for a run folder."""
    now = time.time() if now is None else now
    cfg = _read_config(run_dir)
    history = report.read_history(run_dir / "history.csv")
    last = _read_json(run_dir / "last.json") or {}
    best = _read_json(run_dir / "best.json") or {}
    ckpts = [(c.epoch, c.step) for c in list_checkpoints(run_dir)]   # (epochs done, step), oldest first
    done = int(last.get("epoch", ckpts[-1][0] if ckpts else (history[-1]["epoch"] if history else 0)))
    step = int(last.get("step", 0) or 0)
    planned = cfg.get("epochs")
    entries = list(run_dir.iterdir())
    updated = max([p.stat().st_mtime for p in entries] + [run_dir.stat().st_mtime])
    leftovers = [p.name for p in entries if p.name.startswith(TMP_PREFIX)]
    log_end = _last_log_line(run_dir)
    body = log_end[20:] if len(log_end) > 20 and log_end[:4].isdigit() else log_end  # drop the timestamp
    marker = _read_json(run_dir / MARKER)
    alive: Optional[bool] = None  # None: unknown (no marker, or trained on another host)
    if marker and isinstance(marker.get("pid"), int) and marker.get("host") == socket.gethostname():
        alive = _pid_alive(marker["pid"])
    note = ""
    if alive:
        state = "running"
    elif planned is not None and done >= int(planned) and step == 0 and not leftovers:
        state = "finished"
    elif step > 0 or body.startswith("stopped") or "finishing this step and saving" in body:
        state = "stopped"
        note = f"inside epoch {done + 1} at step {step}" if step else ""
    elif alive is None and marker and not leftovers and now - updated < RUNNING_WINDOW_S:
        state = "running"  # on another host, still writing
    else:
        state = "crashed"
        if body.startswith("Error"):
            note = body[len("Error: "):][:120]
        elif alive is False:
            note = f"process {marker['pid']} is gone (killed?)"
        elif leftovers:
            note = "interrupted save (.tmp- leftover)"
        else:
            note = "no clean end in train.log"
    return {
        "name": run_dir.name, "path": str(run_dir), "dataset": cfg.get("dataset"), "arch": cfg.get("arch"),
        "width": cfg.get("width"), "batch_norm": cfg.get("batch_norm"), "image_size": cfg.get("image_size"),
        "epochs_done": done, "epochs_planned": planned, "step": step,
        **_outcome(history, best),
        "best_checkpoint": best.get("checkpoint"), "last_checkpoint": last.get("checkpoint"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(updated)), "updated_ts": updated,
        "state": state, "note": note,
    }


def _outcome(history, best_pointer: Dict[str, Any]) -> Dict[str, Any]:
    """Best and last figures with their split named (report.best_summary); without a history, what
    best.json says."""
    if history:
        return report.best_summary(history)
    return {"best_split": None, "best_epoch": best_pointer.get("epoch"), "best_acc": None,
            "best_test_acc": best_pointer.get("test_acc"), "last_epoch": None, "last_test_acc": None}


def list_runs(parent: Path) -> List[Dict[str, Any]]:
    """Every run folder directly under `parent`, newest first."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    rows = []
    for p in parent.iterdir():
        if p.name.startswith(".") or not is_run_dir(p):
            continue
        try:
            rows.append(describe_run(p))
        except OSError as exc:  # unreadable folder: still listed, never a traceback
            rows.append({"name": p.name, "path": str(p), "dataset": None, "arch": None, "width": None,
                         "batch_norm": None, "image_size": None, "epochs_done": 0, "epochs_planned": None,
                         "step": 0, **_outcome([], {}), "best_checkpoint": None,
                         "last_checkpoint": None, "updated": "?", "updated_ts": 0.0, "state": "unreadable",
                         "note": exc.strerror or str(exc)})
    return sorted(rows, key=lambda r: r["updated_ts"], reverse=True)


def format_runs(rows: List[Dict[str, Any]]) -> str:
    def acc(v):
        return "-" if v is None else f"{v:.4f}"

    def arch(r):
        s = str(r["arch"] or "?")
        if r.get("width") is not None:
            s += f" x{r['width']:g}"
        if r.get("batch_norm"):
            s += " +BN"
        if r.get("image_size"):
            s += f" {r['image_size']}px"
        return s

    def best(r):  # the accuracy "best" was chosen on, with its split
        if r.get("best_acc") is None:
            return acc(r.get("best_test_acc")) + (" test" if r.get("best_test_acc") is not None else "")
        return f"{r['best_acc']:.4f} {r['best_split']} (ep {r['best_epoch']})"

    table = [("run", "dataset", "architecture", "epochs", "best", "last test acc", "updated", "state")]
    for r in rows:
        state = r["state"] + (f" ({r['note']})" if r["note"] else "")
        table.append((r["name"], str(r["dataset"] or "?"), arch(r),
                      f"{r['epochs_done']}/{r['epochs_planned'] if r['epochs_planned'] is not None else '?'}",
                      best(r), acc(r["last_test_acc"]), r["updated"].replace("T", " ")[:16], state))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table)
