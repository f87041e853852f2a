"""Test-only seams, installed once at start-up (`install_from_env`, called by the CLI) and only when
their environment variable is set; the training and save paths carry no test code.

* VGG_GLUON_CRASH_AT=<stage>[@N]: SIGKILL this process at a stage of a checkpoint save (the N-th
  time it is reached); VGG_GLUON_SLOW_AT=<stage>:<seconds>: sleep there, so a test can send a
  signal while a save is in progress. Stages, in the order of a save: after-params, after-states,
  before-manifest, before-pointer, after-pointer; and train-step (after every training step, to
  make an epoch slow enough to be hit on a fast machine). The fault-injection tests
  (tests/test_faults.py) hit exact points of a save in a real training process this way.
* VGG_GLUON_DIST_DUMP=<folder>: every distributed worker writes its final weights and epoch rows
  there (worker-<rank>.params / .json), so tests can compare the workers.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Dict

CRASH_ENV, SLOW_ENV, DUMP_ENV = "VGG_GLUON_CRASH_AT", "VGG_GLUON_SLOW_AT", "VGG_GLUON_DIST_DUMP"
_hits: Dict[str, int] = {}
_installed = False


def _stage(name: str) -> None:
    crash, slow = os.environ.get(CRASH_ENV), os.environ.get(SLOW_ENV)
    n = _hits[name] = _hits.get(name, 0) + 1
    if slow and slow.split(":")[0] == name:
        time.sleep(float(slow.split(":")[1]))
    if crash and (crash == name or crash == f"{name}@{n}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _after(fn, stage, when=lambda *a, **k: True):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if when(*args, **kwargs):
            _stage(stage)
        return out
    return wrapper


def _before(fn, stage, when=lambda *a, **k: True):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            _stage(stage)
        return fn(*args, **kwargs)
    return wrapper


def _install_faults() -> None:
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import data
    ck._save_params_checked = _after(ck._save_params_checked, "after-params")
    ck.fsync_file = _after(ck.fsync_file, "after-states", lambda path: Path(path).name == ck.STATES)
    ck._write_fsync = _after(ck._write_fsync, "before-manifest", lambda path, data: Path(path).name == ck.META)
    ck.atomic_write_text = _before(ck.atomic_write_text, "before-pointer",
                                   lambda path, text: Path(path).name == "last.json")
    ck.apply_retention = _before(ck.apply_retention, "after-pointer")
    epoch = data.BatchLoader.epoch

    @functools.wraps(epoch)
    def slow_epoch(self, *args, **kwargs):
        for batch in epoch(self, *args, **kwargs):
            yield batch
            if self.train:
                _stage("train-step")   # the consumer has trained on the batch
    data.BatchLoader.epoch = slow_epoch


def _install_dist_dump(folder: Path) -> None:
    from vgg_gluon import engine
    fit = engine.fit

    @functools.wraps(fit)
    def fit_and_dump(s, run_dir, **kwargs):
        rows, on_epoch = [], kwargs.get("on_epoch")

        def record(row, best):
            rows.append(row)
            if on_epoch:
                on_epoch(row, best)
        result = fit(s, run_dir, **{**kwargs, "on_epoch": record})
        if s.dist is not None:
            folder.mkdir(parents=True, exist_ok=True)
            s.net.save_parameters(str(folder / f"worker-{s.dist.rank}.params"))
            (folder / f"worker-{s.dist.rank}.json").write_text(
                json.dumps({"rank": s.dist.rank, "num_workers": s.dist.num_workers, "rows": rows}))
        return result
    engine.fit = fit_and_dump


def install_from_env() -> None:
    """Install the seams whose variables are set (once per process); nothing otherwise."""
    global _installed
    if _installed:
        return
    _installed = True
    if os.environ.get(CRASH_ENV) or os.environ.get(SLOW_ENV):
        _install_faults()
    if os.environ.get(DUMP_ENV):
        _install_dist_dump(Path(os.environ[DUMP_ENV]))
