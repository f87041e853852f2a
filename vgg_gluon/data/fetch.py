"""Getting the files: checksum-verified downloads into place, and safe extraction of archives."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from vgg_gluon.data import base
from vgg_gluon.data.base import DataError

if TYPE_CHECKING:  # pragma: no cover - hints only
    pass

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Downloads and archives


def download(url: str, dest: Path, md5: Optional[str] = None, sha256: Optional[str] = None,
             timeout: float = 60.0) -> Path:
    """Download url to dest, verifying md5/sha256 of the bytes received.

    Streams into a temp file in dest's folder and renames it into place only once verified,
    so an interrupted or corrupted download never leaves a file at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashers = {k: hashlib.new(k) for k, v in (("md5", md5), ("sha256", sha256)) if v}
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    log.info("downloading %s -> %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DataError(f"cannot download {url}: {reason}; check the network connection "
                                f"or put the file at {dest} yourself") from None
            with resp:
                total = 0
                last_log = time.monotonic()
                while True:
                    try:
                        chunk = resp.read(1 << 20)
                    except OSError as exc:
                        raise DataError(f"download of {url} failed after {total} bytes: {exc}; "
                                        f"run again") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    total += len(chunk)
                    if time.monotonic() - last_log > 5:
                        log.info("  %.1f MB", total / 1e6)
                        last_log = time.monotonic()
            out.flush()
            os.fsync(out.fileno())
        for algo, want in (("md5", md5), ("sha256", sha256)):
            if want:
                got = hashers[algo].hexdigest()
                if got != want.lower():
                    raise DataError(f"download of {url} is corrupted ({algo} {got}, expected {want}); "
                                    f"run again")
        os.replace(tmp, dest)
    except BaseException:
        # Including KeyboardInterrupt: never leave a partial file behind.
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _safe_member_path(name: str) -> Optional[str]:
    """The relative POSIX path a tar member may be written to ("" for the archive root),
    or None if it must be refused. Plain string work: this runs once per member (60,000)."""
    if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def safe_extract(archive: Path, dest: Path) -> List[str]:
    """Extract a tar archive into dest, refusing the whole archive on any unsafe member.

    Unsafe: absolute paths, '..' components, symbolic or hard links, devices and FIFOs.
    Files are written by us (not by tarfile.extract), without the archive's permission bits,
    so nothing in an archive can escape dest or plant a setuid file. Everything is written
    to a temp folder inside dest first, so a refused or broken archive leaves dest untouched;
    on success the top-level entries are moved into dest (replacing same-named ones).
    Returns the names of the top-level entries.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    made = {str(tmp)}
    try:
        try:
            # Stream mode ("r|*"): one sequential pass over the (gzip) stream.
            with tarfile.open(archive, mode="r|*") as tar:
                for m in tar:
                    rel = _safe_member_path(m.name)
                    if rel is None:
                        raise DataError(f"refusing {archive}: member {m.name!r} has an absolute "
                                        f"or '..' path")
                    if m.issym() or m.islnk():
                        raise DataError(f"refusing {archive}: member {m.name!r} is a link")
                    if not (m.isfile() or m.isdir()):
                        raise DataError(f"refusing {archive}: member {m.name!r} is not a regular "
                                        f"file or folder")
                    target = os.path.join(tmp, rel) if rel else str(tmp)
                    if m.isdir():
                        os.makedirs(target, exist_ok=True)
                        made.add(target)
                        continue
                    parent = os.path.dirname(target)
                    if parent not in made:
                        os.makedirs(parent, exist_ok=True)
                        made.add(parent)
                    src = tar.extractfile(m)
                    assert src is not None
                    with open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                    # Keep mtimes so the decoded-cache fingerprint is stable across re-extraction.
                    os.utime(target, (m.mtime, m.mtime))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}; the archive is damaged or not a "
                            f"tar file") from None
        tops = sorted(p.name for p in tmp.iterdir())
        for top in tops:
            final = dest / top
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            os.replace(tmp / top, final)
        return tops
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_cifar10(data_dir: Path) -> None:
    own = data_dir / "cifar10"
    tar_path = own / "cifar-10-binary.tar.gz"
    download(base.CIFAR10_BINARY_URL, tar_path, md5=base.CIFAR10_BINARY_MD5)
    safe_extract(tar_path, own)
    tar_path.unlink()  # the extracted batches are all we read; 160 MB less on disk
