"""Run folders and crash-safe checkpoints.

Layout of a run folder::

    config.yaml            resolved RunConfig
    history.csv            one row per finished epoch
    train.log              the epoch lines the CLI printed
    curves.png             loss / accuracy per epoch
    epoch-0003/            a committed checkpoint (end of epoch 3)
        model.params       weights (Block.save_parameters)
        trainer.states     optimizer state incl. momentum, update count and LR schedule
        meta.json          format version, epoch, metrics, config, preprocessing
        MANIFEST.json      SHA-256 and size of the three files above; written last
    epoch-0004-step-00120/ a mid-epoch checkpoint written on Ctrl-C / SIGTERM
    last.json, best.json   pointers: {"checkpoint": "epoch-0003", ...}

A checkpoint is written into a temporary folder (``.tmp-...``), every file fsynced, the manifest
written last, the folder renamed into place and the run folder fsynced; only then does the
``last.json`` pointer move (atomically, by rename). A crash at any point leaves either the old
pointer and a stray temporary folder (removed at the next start) or a complete new checkpoint.
Retention deletes old checkpoints only after the new one is committed, and never the best one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from vgg_gluon.errors import CheckpointError, mxnet_error_reason
from vgg_gluon.fsutil import (  # noqa: F401  (re-exported: report, runs and tests use them from here)
    TMP_PREFIX,
    atomic_write,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    sha256_file,
    unlink_quietly,
)
from vgg_gluon.trainer_states import load_trainer_states, safe_unpickle_states  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARAMS, STATES, META, MANIFEST = "model.params", "trainer.states", "meta.json", "MANIFEST.json"
#: Files a checkpoint may hold besides the three above (a technique's state, e.g. lookahead).
OPTIONAL_FILES = frozenset({"lookahead.params"})
CKPT_RE = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{5,}))?$")




class NewerFormatError(CheckpointError):
    """Written by a newer vgg-gluon: never skipped over in favour of an older checkpoint."""


def _check_format(path: Path, version: Any) -> None:
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise NewerFormatError(f"{path}: written by a newer vgg-gluon (format {version}, this one reads "
                               f"{FORMAT_VERSION}): upgrade vgg-gluon")


# ---------------------------------------------------------------------------------------------
# checkpoints
@dataclass
class Checkpoint:
    path: Path
    epoch: int          # epochs completed (for a mid-epoch checkpoint: the epoch it is inside is epoch+1)
    step: int           # batches done inside the next epoch; 0 for an end-of-epoch checkpoint

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def meta(self) -> Dict[str, Any]:
        return read_meta(self.path / META)


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """The folder name of a checkpoint after `epoch` complete epochs and `step` batches of the next
    one. A mid-epoch checkpoint is named after the epoch it is inside: stopped in epoch 3 after
    step 20 -> epoch-0003-step-00020 (before 2026-12 the name said epoch-0002-step-00020; such
    folders are still read, by the epoch count in their meta.json)."""
    return f"epoch-{epoch:04d}" if not step else f"epoch-{epoch + 1:04d}-step-{step:05d}"


def _checkpoint_at(path: Path, m: "re.Match") -> Checkpoint:
    """A Checkpoint from a folder name matched by CKPT_RE: epochs done and steps into the next."""
    number, step = int(m.group(1)), int(m.group(2) or 0)
    if not step:
        return Checkpoint(path, number, 0)
    try:  # meta.json's epoch count tells the naming: the epoch in progress (now) or done (old)
        done = json.loads((path / META).read_text(encoding="utf-8")).get("epoch")
    except (OSError, ValueError):
        done = None
    if not isinstance(done, int) or done not in (number, number - 1):
        done = number - 1
    return Checkpoint(path, done, step)


def read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_meta(path: Path) -> Dict[str, Any]:
    meta = read_json(path)
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: no format_version: not a vgg-gluon checkpoint")
    _check_format(path, version)
    for key in ("epoch", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}'")
    return meta


def verify(ckpt: Checkpoint) -> None:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    manifest = read_json(ckpt.file(MANIFEST))
    _check_format(ckpt.file(MANIFEST), manifest.get("format_version"))
    files = manifest.get("files")
    if (not isinstance(files, dict) or not {PARAMS, STATES, META} <= set(files)
            or set(files) - {PARAMS, STATES, META} - OPTIONAL_FILES):
        raise CheckpointError(f"{ckpt.file(MANIFEST)}: incomplete manifest")
    for name, entry in files.items():
        path = ckpt.file(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing from checkpoint") from None
        if size != entry.get("size"):
            raise CheckpointError(f"{path}: corrupted (size {size}, manifest says {entry.get('size')})")
        if sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{path}: corrupted (SHA-256 differs from the manifest)")
    read_meta(ckpt.file(META))


def list_checkpoints(run_dir: Path) -> List[Checkpoint]:
    """Committed-looking checkpoints (final name and a manifest), oldest first. Not verified."""
    out = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            out.append(_checkpoint_at(p, m))
    return sorted(out, key=lambda c: (c.epoch, c.step))


def read_pointer(run_dir: Path, which: str) -> Optional[Checkpoint]:
    path = Path(run_dir) / f"{which}.json"
    if not path.exists():
        return None
    pointer = read_json(path)
    name = pointer.get("checkpoint")
    m = CKPT_RE.match(str(name or ""))
    if not m:
        raise CheckpointError(f"{path}: points to '{name}', not a checkpoint name")
    epoch, step = pointer.get("epoch"), pointer.get("step")
    if isinstance(epoch, int) and isinstance(step, int) and step == int(m.group(2) or 0):
        return Checkpoint(Path(run_dir) / name, epoch, step)   # the pointer says it
    return _checkpoint_at(Path(run_dir) / name, m)


LOCK = ".lock"   # the lock file of runs before 2026-12 (left alone; the folder itself is locked now)
MARKER = ".running.json"   # pid and host of the training process (runs.RunMarker writes it)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold a lock (flock on the run folder itself) while a process trains into `run_dir`, so a
    second train or resume of the same run is refused instead of deleting the first one's save in
    progress or interleaving checkpoints. The kernel drops the lock when the process dies, kill -9
    included; where the file system has no flock (some network mounts), the run goes on unlocked.

    Nothing is created or written: a command that is then refused (a damaged checkpoint, a setting
    that cannot change) leaves every byte of the run folder as it was, runs from before the lock
    included. (Until 2026-12 the lock was a RUN/.lock file; such files are left alone.) The
    holder's pid for the message comes from the kernel's lock table."""
    import fcntl
    try:
        fd = os.open(str(run_dir), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd, Path(run_dir))
            raise CheckpointError(f"{run_dir}: in use by another vgg-gluon process"
                                  + (f" (pid {holder})" if holder else "") + "; wait for it to finish or stop "
                                  "it (Ctrl-C saves a checkpoint), then resume") from None
        except OSError:
            pass  # no flock on this file system
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int, run_dir: Path) -> Optional[int]:
    """The pid holding the flock on the open file `fd`: from /proc/locks (Linux; lines such as
    `2: FLOCK  ADVISORY  WRITE 14097 fe:00:2146374 0 EOF`), else the training process named in
    RUN/.running.json (MARKER), else None."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        table = ""
    for line in table.splitlines():
        parts = line.split()   # waiting requests read "N: -> FLOCK ...": not the holder
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == where and parts[4].isdigit():
            return int(parts[4])
    try:
        pid = json.loads((run_dir / MARKER).read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def cleanup_temp(run_dir: Path) -> int:
    """Remove leftovers of interrupted saves; returns how many were removed."""
    n = 0
    for p in Path(run_dir).glob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            unlink_quietly(p)
        n += 1
    if n:
        log.info("removed %d leftover temporary file(s) of an interrupted save in %s", n, run_dir)
    return n


def select_checkpoint(run_dir: Path, which: str = "last") -> Checkpoint:
    """The checkpoint to resume or evaluate: the pointer's target if it verifies, else the newest
    complete one (with a warning naming what was wrong)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    problems: List[str] = []
    try:
        pointed = read_pointer(run_dir, which)
    except CheckpointError as exc:
        pointed, _ = None, problems.append(str(exc))
    if pointed is not None:
        try:
            verify(pointed)
            return pointed
        except NewerFormatError:
            raise  # an older checkpoint would silently undo the newer version's work
        except CheckpointError as exc:
            problems.append(str(exc))
    candidates = list_checkpoints(run_dir)
    if which == "best":
        candidates.sort(key=lambda c: _best_key(c))
    for ckpt in reversed(candidates):
        if pointed is not None and ckpt.path == pointed.path:
            continue
        try:
            verify(ckpt)
        except NewerFormatError:
            raise
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            log.warning("%s; using the previous complete checkpoint %s", problems[0], ckpt.name)
        return ckpt
    if problems:
        raise CheckpointError(f"{problems[0]}; no other complete checkpoint in {run_dir}")
    raise CheckpointError(f"{run_dir}: no checkpoint yet (is this a vgg-gluon run folder?)")


def _best_key(ckpt: Checkpoint) -> float:
    """What training chose "best" on: validation accuracy when the run held some out, else test."""
    try:
        metrics = ckpt.meta().get("metrics", {})
        return float(metrics.get("val_acc", metrics.get("test_acc", -1.0)))
    except CheckpointError:
        return -1.0


def save_checkpoint(run_dir: Path, net, trainer, meta: Dict[str, Any], *, epoch: int, step: int = 0,
                    is_best: bool = False, keep_last: int = 3, extras=None) -> Checkpoint:
    """Commit one checkpoint atomically, move the pointers, then apply retention.

    extras: {file name (one of OPTIONAL_FILES): writer(path)}, written and listed in the manifest."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(epoch, step)
    tmp = run_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _save_params_checked(net, tmp / PARAMS)
        trainer.save_states(str(tmp / STATES))
        fsync_file(tmp / STATES)
        meta = dict(meta, format_version=FORMAT_VERSION, epoch=epoch, step=step,
                    saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_fsync(tmp / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        for name, writer in (extras or {}).items():
            assert name in OPTIONAL_FILES, name
            writer(tmp / name)
            fsync_file(tmp / name)
        files = {n: {"sha256": sha256_file(tmp / n), "size": (tmp / n).stat().st_size}
                 for n in (PARAMS, STATES, META, *(extras or {}))}
        _write_fsync(tmp / MANIFEST, json.dumps({"format_version": FORMAT_VERSION, "files": files},
                                                 indent=2, sort_keys=True).encode())
        fsync_dir(tmp)
        if final.exists():
            # A newer checkpoint of an abandoned timeline (e.g. committed but never pointed to
            # before a crash): keep it aside rather than delete what a user may want.
            aside = run_dir / f"{final.name}.replaced-{int(time.time())}"
            os.replace(final, aside)
            log.warning("moved existing %s aside to %s", final.name, aside.name)
        os.replace(tmp, final)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt = Checkpoint(final, epoch, step)
    pointer = {"checkpoint": final.name, "epoch": epoch, "step": step,
               "test_acc": meta.get("metrics", {}).get("test_acc")}
    if "val_acc" in meta.get("metrics", {}):
        pointer["val_acc"] = meta["metrics"]["val_acc"]   # what "best" was chosen on
    atomic_write_text(run_dir / "last.json", json.dumps(pointer, indent=2) + "\n")
    if is_best:
        atomic_write_text(run_dir / "best.json", json.dumps(pointer, indent=2) + "\n")
    apply_retention(run_dir, keep_last)
    return ckpt


def _save_params_checked(net, path: Path) -> None:
    """`net.save_parameters`, then fsync and read back. MXNet's file writer closes without
    checking, so a disk that fills up during the final flush would leave a silently truncated file
    (which the manifest would then bless); a failed write becomes ENOSPC or one clear line."""
    try:
        net.save_parameters(str(path))
        fsync_file(path)
        import mxnet as mx
        mx.nd.load(str(path))
    except OSError:
        raise
    except Exception as exc:
        need = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                   for p in net.collect_params().values() if p.shape)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if free is not None and free < 2 * need + (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        why = mxnet_error_reason(exc)
        raise CheckpointError(f"{path}: writing the weights failed ({why[:200]}); "
                              "the previous checkpoint is intact") from None


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def apply_retention(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` end-of-epoch checkpoints; keep the pointed-to ones."""
    protected = set()
    for which in ("last", "best"):
        try:
            ptr = read_pointer(run_dir, which)
        except CheckpointError:
            continue
        if ptr is not None:
            protected.add(ptr.path.name)
    ckpts = list_checkpoints(run_dir)
    last = read_pointer(run_dir, "last")
    # Mid-epoch checkpoints are superseded by any later checkpoint.
    for c in ckpts:
        if c.step and c.name not in protected and last is not None and (c.epoch, c.step) < (last.epoch, last.step):
            _remove_checkpoint(c.path)
    ends = [c for c in list_checkpoints(run_dir) if not c.step]
    for c in ends[:-keep_last] if keep_last > 0 else []:
        if c.name not in protected:
            _remove_checkpoint(c.path)
    fsync_dir(run_dir)


def _remove_checkpoint(path: Path) -> None:
    """Rename to a temporary name first, so a crash mid-delete leaves no half checkpoint under a
    real name (cleanup_temp removes the rest at the next start)."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)
