"""Data sets as uint8 arrays, and a vectorized batch iterator for MXNet Gluon.

* `base`: the data sets' names, classes, official files and checksums; Split, Dataset, DataError.
* `fetch`: checksum-verified downloads and safe archive extraction.
* `readers` (numpy only): Fashion-MNIST idx files and CIFAR-10 (binary batches or an image-folder
  copy) -> Dataset of uint8 (N, H, W, C) arrays; `load_dataset`.
* `pipeline` (MXNet): `transform_batch` and `BatchLoader`.
`prepare_dataset` here is the `vgg-gluon data` command's worker.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from vgg_gluon.data.base import *  # noqa: F401,F403  (the data sets' names and types)
from vgg_gluon.data.base import CIFAR10_BINARY_DIR, DataError, canonical_name
from vgg_gluon.data.fetch import safe_extract
from vgg_gluon.data.pipeline import BatchLoader, cutout_mask, transform_batch  # noqa: F401
from vgg_gluon.data.readers import _is_image_folder_root, load_dataset
from vgg_gluon.fsutil import atomic_write_text

log = logging.getLogger(__name__)

_ARCHIVE_MARKER = ".from-archive.json"


def _archive_stamp(archive: Path) -> Dict[str, object]:
    """What identifies an archive for prepare_dataset's "already extracted" check."""
    st = archive.stat()
    return {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_dataset(name: str, data_dir: Path, from_archive: Optional[Path] = None,
                    download: bool = True) -> str:
    """Make a data set available under data_dir (the `vgg-gluon data` command); return a summary.

    For cifar10, ``from_archive`` is an image-folder tar (train/<class>/*, test/<class>/*,
    possibly under one top folder) or the official binary tar; it is extracted safely into
    data_dir/cifar10 and the decoded cache is built. Re-running with the same archive skips
    the extraction (a marker records the archive's path, size and mtime) and reuses the cache.
    """
    name = canonical_name(name)
    data_dir = Path(data_dir)
    if from_archive is not None:
        if name != "cifar10":
            raise DataError("--from-archive is for cifar10 only; Fashion-MNIST comes from "
                            "`apt-get install dataset-fashion-mnist` or is downloaded")
        archive = Path(from_archive)
        if not archive.is_file():
            raise DataError(f"archive {archive} does not exist")
        own = data_dir / "cifar10"
        marker = own / _ARCHIVE_MARKER
        stamp = _archive_stamp(archive)
        done = False
        if marker.is_file():
            try:
                old = json.loads(marker.read_text())
                done = ({k: old.get(k) for k in stamp} == stamp
                        and all((own / top).is_dir() for top in old.get("extracted") or ["?"]))
            except (ValueError, AttributeError):
                done = False
        if done:
            log.info("%s already extracted into %s", archive, own)
        else:
            t0 = time.perf_counter()
            marker.unlink(missing_ok=True)
            stamp["extracted"] = _extract_cifar_archive(archive, own)
            atomic_write_text(marker, json.dumps(stamp))
            log.info("extracted %s into %s in %.1f s", archive, own, time.perf_counter() - t0)
    ds = load_dataset(name, data_dir, download=download)
    verified = ("; content checksums verified" if name == "fashion-mnist"
                and (len(ds.train), len(ds.test)) == (60000, 10000) else "")
    return (f"{name}: {len(ds.train)} train / {len(ds.test)} test images, {len(ds.classes)} classes, "
            f"from {ds.source}{verified}")


def _extract_cifar_archive(archive: Path, own: Path) -> List[str]:
    """Extract archive into own so that own/train+own/test or own/cifar-10-batches-bin exist;
    return those folder names."""
    own.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".archive-", dir=own))
    try:
        safe_extract(archive, staging)
        # Accept the layout at the top of the archive or under a single top folder.
        candidates = [staging] + sorted(p for p in staging.iterdir() if p.is_dir())
        for cand in candidates:
            if (cand / CIFAR10_BINARY_DIR / "test_batch.bin").is_file():
                moves = [CIFAR10_BINARY_DIR]
            elif _is_image_folder_root(cand):
                moves = ["train", "test"]
            else:
                continue
            for top in moves:
                final = own / top
                if final.is_dir():
                    shutil.rmtree(final)
                os.replace(cand / top, final)
            return moves
        raise DataError(f"{archive} holds neither train/<class>/ + test/<class>/ image folders nor "
                        f"{CIFAR10_BINARY_DIR}/")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
