"""A run's life: its folder (creation, config.yaml), what a resume continues from, and the one
place a trainer is restored from a checkpoint. The command line (cli/train.py) prints and drives
the training; this module decides."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from vgg_gluon import checkpoint as ck
from vgg_gluon import report
from vgg_gluon.config import ConfigError, RunConfig

# Settings that may change when a run is resumed; the others define the run.
RESUME_OVERRIDABLE = {"epochs", "ctx", "kvstore", "data_dir", "keep_last", "log_interval"}


def new_run_dir(cfg: RunConfig) -> Path:
    """Create the run's folder: --name as given (refused if it holds anything), else
    <dataset>-<arch>-<time> with a suffix when that exists."""
    parent = Path(cfg.output_dir)
    name = cfg.run_name or f"{cfg.dataset}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = parent / name
    if cfg.run_name is None:
        i = 1
        while run_dir.exists():
            i += 1
            run_dir = parent / f"{name}-{i}"
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already exists: resume it with `vgg-gluon resume {run_dir}` "
                          "or choose another --name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {run_dir} ({exc.strerror or exc}): "
                          "choose another --output-dir") from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"{run_dir}: not writable: choose another --output-dir")
    return run_dir


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    ck.atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def never_checkpointed(run_dir: Path) -> bool:
    """A run folder train created (config.yaml) that was stopped before its first checkpoint."""
    return ((run_dir / "config.yaml").is_file() and not ck.list_checkpoints(run_dir)
            and not any((run_dir / f"{w}.json").exists() for w in ("last", "best"))
            and not any(ck.CKPT_RE.match(p.name) for p in run_dir.iterdir()))


def recover_history(run_dir: Path, done: int) -> List[Dict[str, Any]]:
    """history.csv rows of epochs 1..done; a row lost by a kill between a checkpoint's commit and
    the history write is taken back from that checkpoint's meta.json."""
    rows = [r for r in report.read_history(run_dir / "history.csv") if r["epoch"] <= done]
    have, recovered = {r["epoch"] for r in rows}, False
    for c in ck.list_checkpoints(run_dir):
        if c.step or c.epoch > done or c.epoch in have:
            continue
        try:
            metrics = c.meta().get("metrics") or {}
        except ck.CheckpointError:
            continue
        if metrics.get("epoch") == c.epoch:
            rows.append(dict(metrics))
            have.add(c.epoch)
            recovered = True
    rows = sorted(rows, key=lambda r: r["epoch"])
    if recovered:
        report.write_history(run_dir / "history.csv", rows)
    return rows


def restore_trainer(session, c: ck.Checkpoint, meta: Dict[str, Any]) -> None:
    """The optimizer state of checkpoint `c` into the session's trainer: momentum and update count
    (dist_async: the update count only), checked against the checkpoint; then the schedule is
    always installed again from the settings at that update count (a new --epochs, and a schedule
    pickled by an older version is not trusted)."""
    from vgg_gluon import engine
    from vgg_gluon.distributed import load_trainer_states
    load_trainer_states(session, c.file(ck.STATES))
    engine.restore_extras(session, c)   # lookahead's slow weights
    got, want = int(session.trainer._optimizer.num_update), meta.get("num_update")
    if isinstance(want, int) and got != want:
        raise ck.CheckpointError(f"{c.file(ck.STATES)}: optimizer state is from update {got} but {c.name} was "
                                 f"saved at update {want} (a .states file from another checkpoint?)")
    if session.dist is None or session.dist.sync:
        # (dist_async: load_trainer_states already gave the servers the new schedule.)
        engine.install_schedule(session.trainer, session.cfg, len(session.train_loader))


@dataclass
class Resumption:
    """What `resume RUN` continues: a session at epoch `start_epoch` (+ `partial` steps), or
    nothing (session None) when the run has all its epochs; `note` says which."""
    session: Any
    start_epoch: int = 0
    partial: Any = None
    best_acc: float = -1.0
    note: str = ""
    fresh: bool = False      # no checkpoint yet: the run starts again from its config.yaml


def resume_run(run_dir: Path, configure: Callable[[RunConfig, str], RunConfig]) -> Resumption:
    """Load what continues the run in `run_dir`. `configure(cfg, source)` applies the user's
    allowed changes (--epochs, --ctx, ...) to the run's own settings read from `source`."""
    from vgg_gluon import engine
    ck.cleanup_temp(run_dir)
    if never_checkpointed(run_dir):
        # Stopped (e.g. killed) inside epoch 1: nothing to load, but the run's settings are known.
        source = run_dir / "config.yaml"
        session = engine.build_session(configure(RunConfig.from_yaml(source), str(source)), resuming=True)
        return Resumption(session, fresh=True, note=f"{run_dir} has no checkpoint yet (it stopped inside "
                                                    "epoch 1): starting it again from its config.yaml")
    c = ck.select_checkpoint(run_dir, "last")
    meta = c.meta()
    source = f"{c.path}/meta.json"
    cfg = configure(RunConfig.from_dict(meta["config"], source), source)
    if c.epoch >= cfg.epochs:
        # Nothing to train. A run stopped inside epoch c.epoch + 1 keeps that checkpoint and its
        # settings: `--epochs N` below it must not "finish" the run by dropping the stopped epoch.
        recover_history(run_dir, c.epoch)
        stopped = f" (epoch {c.epoch + 1} was stopped at step {c.step})" if c.step else ""
        return Resumption(None, c.epoch, note=f"{run_dir}: already trained {c.epoch} of {cfg.epochs} epochs"
                                              f"{stopped}; pass --epochs N (> {c.epoch}) to train more")
    session = engine.build_session(cfg, params_source=c, resuming=True)
    restore_trainer(session, c, meta)
    session.history = recover_history(run_dir, c.epoch)
    partial = engine.Partial(**meta["partial"]) if meta.get("partial") else None
    where = f" (epoch {c.epoch + 1}, step {c.step})" if c.step else ""
    return Resumption(session, c.epoch, partial, float(meta.get("best_acc", -1.0)),
                      f"resuming {run_dir} from {c.name}{where}")


def start_from_params(session, start_epoch: int) -> None:
    """A new run from a bare .params file: a fresh optimizer that has "done" `start_epoch` epochs,
    so that the schedule lines up."""
    session.trainer._optimizer.num_update = start_epoch * len(session.train_loader)


def config_override_refused(flags: Dict[str, Any]) -> Optional[str]:
    """The first typed setting that may not change on resume, or None."""
    refused = sorted(set(flags) - RESUME_OVERRIDABLE)
    return refused[0] if refused else None
