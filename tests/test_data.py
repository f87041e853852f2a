"""Tests of vgg_gluon.data on small files in the real formats; no network."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tarfile
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from vgg_gluon import data as D

# --------------------------------------------------------------------------------------------
# Writers of the real formats


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    """An idx file of unsigned bytes (magic 0x0000 08 ndim, big-endian dims)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_fashion(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test-labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    names = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
             "test-images": "t10k-images-idx3-ubyte", "test-labels": "t10k-labels-idx1-ubyte"}
    for key, arr in arrays.items():
        write_idx(folder / (names[key] + ".gz"), arr)
    return arrays


def make_cifar_binary(folder: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0):
    """cifar-10-batches-bin with 1 label byte + 3072 channel-major pixel bytes per record."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        rec = np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1)
        (folder / name).write_bytes(rec.tobytes())
        out[name] = (chw.transpose(0, 2, 3, 1), labels)
    (folder / "batches.meta.txt").write_text("\n".join(D.CIFAR10_CLASSES) + "\n\n")
    return out


def make_image_folder(root: Path, classes=("cat", "dog", "ant"), per_class: int = 3, n_test: int = 2,
                      size: int = 32, fmt: str = "PNG") -> None:
    """train/<class>/*.png, test/<class>/*.png with per-image constant colours (lossless PNG)."""
    for split, n in (("train", per_class), ("test", n_test)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                color = (ci * 40, i * 20, 7)
                Image.new("RGB", (size, size), color).save(d / f"{i:04d}.{fmt.lower()}", fmt)


def make_tar(path: Path, members: Dict[str, bytes], prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(payload)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(payload))
    return path


def folder_members(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide Debian's Fashion-MNIST so tests see only their own files."""
    monkeypatch.setattr(D.base, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-fashion")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a test tried to use the network")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --------------------------------------------------------------------------------------------
# Names and shapes


def test_names_and_shapes(monkeypatch, tmp_path):
    assert D.DATASET_NAMES == ("fashion-mnist", "cifar10")
    assert D.canonical_name("fashion_mnist") == "fashion-mnist"
    assert D.canonical_name("CIFAR-10") == "cifar10"
    with pytest.raises(D.DataError, match="unknown data set"):
        D.canonical_name("imagenet")
    assert D.native_size("fashion-mnist") == D.native_size("cifar10") == 32
    assert D.input_shape("fashion-mnist", None) == (1, 32, 32)
    assert D.input_shape("fashion-mnist", 224) == (1, 224, 224)
    assert D.input_shape("cifar10", None) == (3, 32, 32)
    monkeypatch.setenv("VGG_GLUON_DATA_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    monkeypatch.delenv("VGG_GLUON_DATA_DIR")
    assert D.default_data_dir() == Path.cwd() / "data"


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("sub", ["fashion-mnist", ""])
def test_fashion_small_files(tmp_path, no_system_fashion, no_network, sub):
    arrays = make_fashion(tmp_path / sub if sub else tmp_path)
    ds = D.load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.name == "fashion-mnist"
    assert ds.train.images.shape == (12, 28, 28, 1) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int32 and ds.test.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train-images"])
    np.testing.assert_array_equal(ds.test.labels, arrays["test-labels"])
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10
    assert ds.val is None
    assert ds.source == str(tmp_path / sub if sub else tmp_path)
    assert ds.mean[0] == pytest.approx(arrays["train-images"].astype(np.float64).mean())
    assert ds.std[0] == pytest.approx(arrays["train-images"].astype(np.float64).std())


def test_fashion_uncompressed_files(tmp_path, no_system_fashion):
    arrays = make_fashion(tmp_path / "fashion-mnist")
    gz = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    gz.unlink()
    write_idx(gz.with_suffix(""), arrays["test-images"], compress=False)
    ds = D.load_dataset("fashion-mnist", tmp_path, download=False)
    np.testing.assert_array_equal(ds.test.images[..., 0], arrays["test-images"])


def test_fashion_partial_folder_completed_by_download(tmp_path, no_system_fashion, monkeypatch, caplog):
    mirror = tmp_path / "mirror"
    make_fashion(mirror)
    specs = {k: D.base.IdxFile(v.name, hashlib.md5((mirror / (v.name + ".gz")).read_bytes()).hexdigest(),
                           v.sha256, v.count) for k, v in D.base.FASHION_FILES.items()}
    monkeypatch.setattr(D.base, "FASHION_FILES", specs)
    monkeypatch.setattr(D.base, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    own = tmp_path / "data" / "fashion-mnist"
    own.mkdir(parents=True)
    (own / "train-images-idx3-ubyte.gz").write_bytes((mirror / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(D.DataError, match="not found"):
        D.load_dataset("fashion-mnist", tmp_path / "data", download=False)
    assert "only some Fashion-MNIST files" in caplog.text
    ds = D.load_dataset("fashion-mnist", tmp_path / "data", download=True)
    assert len(ds.train) == 12 and len(list(own.iterdir())) == 4
    ds.train.images[0, 0, 0, 0] = 1  # arrays are writable copies


def test_fashion_limits_and_val_split(tmp_path, no_system_fashion):
    make_fashion(tmp_path, n_train=20, n_test=8)
    ds = D.load_dataset("fashion-mnist", tmp_path, download=False, train_limit=10, test_limit=3,
                        val_split=0.3, seed=1)
    full = D.load_dataset("fashion-mnist", tmp_path, download=False)
    assert len(ds.test) == 3 and len(ds.train) == 7 and len(ds.val) == 3
    np.testing.assert_array_equal(ds.test.images, full.test.images[:3])
    # train + val are exactly the first 10 images, disjoint, each in original order.
    rows = {r.tobytes(): i for i, r in enumerate(full.train.images[:10])}
    ti = [rows[r.tobytes()] for r in ds.train.images]
    vi = [rows[r.tobytes()] for r in ds.val.images]
    assert sorted(ti + vi) == list(range(10)) and ti == sorted(ti) and vi == sorted(vi)
    # Deterministic per seed; mean/std of the remaining training split only.
    again = D.load_dataset("fashion-mnist", tmp_path, download=False, train_limit=10, val_split=0.3, seed=1)
    np.testing.assert_array_equal(again.val.images, ds.val.images)
    assert ds.mean[0] == pytest.approx(ds.train.images.astype(np.float64).mean())
    other = D.load_dataset("fashion-mnist", tmp_path, download=False, train_limit=10, val_split=0.3, seed=2)
    assert not np.array_equal(other.val.labels, ds.val.labels) or not np.array_equal(
        other.val.images, ds.val.images)
    with pytest.raises(D.DataError, match="val_split"):
        D.load_dataset("fashion-mnist", tmp_path, download=False, val_split=1.0)
    with pytest.raises(D.DataError, match="empty"):
        D.load_dataset("fashion-mnist", tmp_path, download=False, train_limit=2, val_split=0.1)
    with pytest.raises(D.DataError, match="train_limit"):
        D.load_dataset("fashion-mnist", tmp_path, download=False, train_limit=0)


def test_fashion_missing_offline(tmp_path, no_system_fashion, no_network):
    with pytest.raises(D.DataError) as err:
        D.load_dataset("fashion-mnist", tmp_path, download=False)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "fashion-mnist") in msg
    assert "\n" not in msg


def _corrupt(kind: str, folder: Path, arrays) -> Path:
    target = folder / "train-images-idx3-ubyte.gz"
    if kind == "truncated-gzip":
        target.write_bytes(target.read_bytes()[:-20])
    elif kind == "bad-magic":
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    elif kind == "short-content":
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(raw[:-100]))
    elif kind == "count-mismatch":
        write_idx(target, arrays["train-images"][:-1])
    elif kind == "not-gzip":
        target.write_bytes(b"this is not a gzip file at all")
    elif kind == "bad-label":
        target = folder / "train-labels-idx1-ubyte.gz"
        write_idx(target, np.full(len(arrays["train-labels"]), 11, np.uint8))
    return target


@pytest.mark.parametrize("kind", ["truncated-gzip", "bad-magic", "short-content", "count-mismatch",
                                  "not-gzip", "bad-label"])
def test_fashion_corrupted_files(tmp_path, no_system_fashion, kind):
    folder = tmp_path / "fashion-mnist"
    arrays = make_fashion(folder)
    target = _corrupt(kind, folder, arrays)
    with pytest.raises(D.DataError) as err:
        D.load_dataset("fashion-mnist", tmp_path, download=False)
    assert target.name in str(err.value) and "\n" not in str(err.value)
    assert "delete it and run again" in str(err.value) or kind in ("count-mismatch", "bad-label")


def test_fashion_full_size_checksum(tmp_path, no_system_fashion):
    """A file claiming the official count must have the official content (e.g. not MNIST)."""
    folder = tmp_path / "fashion-mnist"
    make_fashion(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(10000, np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((10000, 28, 28), np.uint8))
    with pytest.raises(D.DataError, match="corrupted or not Fashion-MNIST"):
        D.load_dataset("fashion-mnist", tmp_path, download=False)


def test_fashion_system_dir_used_and_reinstall_hint(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    make_fashion(system)
    monkeypatch.setattr(D.base, "SYSTEM_FASHION_MNIST_DIR", system)
    ds = D.load_dataset("fashion-mnist", tmp_path / "empty", download=False)
    assert ds.source == str(system)
    _corrupt("truncated-gzip", system, None)
    with pytest.raises(D.DataError, match="reinstall"):
        D.load_dataset("fashion-mnist", tmp_path / "empty", download=False)


def test_fashion_download_via_file_url(tmp_path, no_system_fashion, monkeypatch):
    """The download path: official names, MD5 checked, files land in data_dir/fashion-mnist."""
    mirror = tmp_path / "mirror"
    make_fashion(mirror)
    specs = {}
    for key, spec in D.base.FASHION_FILES.items():
        md5 = hashlib.md5((mirror / (spec.name + ".gz")).read_bytes()).hexdigest()
        specs[key] = D.base.IdxFile(spec.name, md5, spec.sha256, spec.count)
    monkeypatch.setattr(D.base, "FASHION_FILES", specs)
    monkeypatch.setattr(D.base, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    data_dir = tmp_path / "data"
    ds = D.load_dataset("fashion-mnist", data_dir, download=True)
    assert len(ds.train) == 12 and ds.source == str(data_dir / "fashion-mnist")
    assert sorted(p.name for p in (data_dir / "fashion-mnist").iterdir()) == sorted(
        s.name + ".gz" for s in specs.values())


def test_fashion_download_with_a_wrong_md5_is_refused(tmp_path, no_system_fashion, monkeypatch):
    """A download whose .gz differs from the official MD5 (here: a small stand-in served instead of
    the official file) is refused and leaves nothing behind. The content SHA-256 check does not
    apply to it (not the official size), so the MD5 is the only guard."""
    mirror = tmp_path / "mirror"
    make_fashion(mirror)
    monkeypatch.setattr(D.base, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    data_dir = tmp_path / "data"
    official = D.base.FASHION_FILES["train-images"].gz_md5
    with pytest.raises(D.DataError, match=rf"is corrupted \(md5 [0-9a-f]{{32}}, expected {official}\)"):
        D.load_dataset("fashion-mnist", data_dir, download=True)
    assert not list((data_dir / "fashion-mnist").iterdir())


def test_data_command(tmp_path, no_system_fashion, monkeypatch):
    """`vgg-gluon data`: CIFAR-10 from an archive (then idempotent), Fashion-MNIST downloaded and
    verified, and --no-download without the files: one line, exit 1, nothing fetched."""
    from conftest import EXIT_INPUT, invoke_cli, one_line_error
    src = tmp_path / "src"
    make_image_folder(src)
    archive = make_tar(tmp_path / "c.tar.gz", folder_members(src))
    data_dir = tmp_path / "data"
    for _ in range(2):
        r = invoke_cli("data", "cifar10", "--data-dir", data_dir, "--from-archive", archive)
        assert r.exit_code == 0, r.output
        assert "9 train / 6 test" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (data_dir / "cifar10" / "decoded-cache.npz").is_file()

    mirror = tmp_path / "mirror"
    make_fashion(mirror)
    monkeypatch.setattr(D.base, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    line = one_line_error(invoke_cli("data", "fashion-mnist", "--data-dir", data_dir, "--no-download"),
                          EXIT_INPUT, "Fashion-MNIST not found")
    assert "apt-get install dataset-fashion-mnist" in line and not (data_dir / "fashion-mnist").exists()
    one_line_error(invoke_cli("data", "fashion-mnist", "--data-dir", data_dir), EXIT_INPUT, "is corrupted (md5")
    md5 = {v.name: hashlib.md5((mirror / (v.name + ".gz")).read_bytes()).hexdigest()
           for v in D.base.FASHION_FILES.values()}
    monkeypatch.setattr(D.base, "FASHION_FILES", {k: D.base.IdxFile(v.name, md5[v.name], v.sha256, v.count)
                                              for k, v in D.base.FASHION_FILES.items()})
    r = invoke_cli("data", "fashion-mnist", "--data-dir", data_dir)
    assert r.exit_code == 0 and "12 train / 5 test" in r.output, r.output
    assert sorted(p.name for p in (data_dir / "fashion-mnist").iterdir()) == sorted(
        v.name + ".gz" for v in D.base.FASHION_FILES.values())


# --------------------------------------------------------------------------------------------
# Downloads


def test_download_file_url_and_checksums(tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(3 << 20)
    src.write_bytes(payload)
    dest = tmp_path / "out" / "file.bin"
    D.fetch.download(src.as_uri(), dest, md5=hashlib.md5(payload).hexdigest(),
               sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(D.DataError, match="corrupted"):
        D.fetch.download(src.as_uri(), bad, md5="0" * 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]  # no bad.bin, no temp


def test_download_interrupted_leaves_nothing(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        def __init__(self):
            super().__init__(b"x" * (3 << 20))
            self.calls = 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 2:
                raise KeyboardInterrupt
            return super().read(n)

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Broken())
    with pytest.raises(KeyboardInterrupt):
        D.fetch.download("http://example.invalid/f", tmp_path / "f.bin")
    assert list(tmp_path.iterdir()) == []

    def unreachable(*a, **k):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(D.DataError, match="cannot download"):
        D.fetch.download("http://example.invalid/f", tmp_path / "f.bin")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("where", ["cifar10/cifar-10-batches-bin", "cifar-10-batches-bin"])
def test_cifar_binary(tmp_path, no_network, where):
    written = make_cifar_binary(tmp_path / where)
    ds = D.load_dataset("cifar10", tmp_path, download=False)
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (6, 32, 32, 3) and ds.test.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train.images[4:8], written["data_batch_2.bin"][0])
    np.testing.assert_array_equal(ds.test.labels, written["test_batch.bin"][1])
    assert ds.classes == list(D.CIFAR10_CLASSES)
    assert ds.source == str(tmp_path / where)
    assert len(ds.mean) == 3 and len(ds.std) == 3
    ref = ds.train.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ds.mean, ref.mean(0))
    np.testing.assert_allclose(ds.std, ref.std(0))


def test_cifar_binary_corrupted(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    make_cifar_binary(folder)
    with open(folder / "data_batch_3.bin", "ab") as f:
        f.write(b"\x01\x02")
    with pytest.raises(D.DataError, match="data_batch_3.bin is corrupted"):
        D.load_dataset("cifar10", tmp_path, download=False)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(D.DataError, match="lacks data_batch_3.bin"):
        D.load_dataset("cifar10", tmp_path, download=False)


def test_cifar_missing_offline(tmp_path, no_network):
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar10", tmp_path, download=False)
    assert "make data" in str(err.value) and "--from-archive" in str(err.value)


@pytest.mark.parametrize("where", ["cifar10", ""])
def test_image_folder_and_cache(tmp_path, no_network, where, caplog):
    root = tmp_path / where if where else tmp_path
    make_image_folder(root)
    ds = D.load_dataset("cifar10", tmp_path, download=False)
    assert ds.classes == ["ant", "cat", "dog"]  # sorted folder names = label order
    assert ds.train.images.shape == (9, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)
    # Interleaved across classes: 1st of each class, then 2nd, ... (balanced train_limit).
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    # ant is class index 2 in make_image_folder's order -> colour (80, i*20, 7).
    assert ds.train.images[0, 5, 5].tolist() == [80, 0, 7]
    assert ds.train.images[3, 0, 0].tolist() == [80, 20, 7]
    cache = root / "decoded-cache.npz"
    assert cache.is_file()
    assert not [p for p in root.iterdir() if ".tmp" in p.name]

    # A second load uses the cache (the decoder is not called).
    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache is valid")
    orig = D.readers._decode_images
    D.readers._decode_images = no_decode
    try:
        again = D.load_dataset("cifar10", tmp_path, download=False, train_limit=4)
    finally:
        D.readers._decode_images = orig
    np.testing.assert_array_equal(again.train.images, ds.train.images[:4])
    assert again.classes == ds.classes

    # A new file invalidates it.
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "train" / "cat" / "9999.png")
    changed = D.load_dataset("cifar10", tmp_path, download=False)
    assert len(changed.train) == 10
    # A damaged cache is ignored and rewritten.
    cache.write_bytes(b"garbage")
    assert len(D.load_dataset("cifar10", tmp_path, download=False).train) == 10
    with np.load(cache) as z:
        assert z["train_images"].shape == (10, 32, 32, 3)


def test_image_folder_resizes_and_rejects_bad_images(tmp_path):
    root = tmp_path / "cifar10"
    make_image_folder(root, size=40, fmt="JPEG", per_class=1, n_test=1)
    ds = D.load_dataset("cifar10", tmp_path, download=False)
    assert ds.train.images.shape == (3, 32, 32, 3)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(D.DataError, match="broken.jpg"):
        D.load_dataset("cifar10", tmp_path, download=False)


def test_image_folder_test_class_unknown(tmp_path):
    make_image_folder(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "test" / "zebra").mkdir()
    with pytest.raises(D.DataError, match="zebra"):
        D.load_dataset("cifar10", tmp_path, download=False)


def test_binary_preferred_over_folder(tmp_path):
    make_image_folder(tmp_path / "cifar10")
    make_cifar_binary(tmp_path / "cifar10" / "cifar-10-batches-bin")
    ds = D.load_dataset("cifar10", tmp_path, download=False)
    assert ds.source.endswith("cifar-10-batches-bin")


# --------------------------------------------------------------------------------------------
# Archives


def test_prepare_from_image_folder_archive(tmp_path, no_network):
    src = tmp_path / "src"
    make_image_folder(src / "cifar10-jpeg")  # under one top folder, as some archives are
    archive = make_tar(tmp_path / "c.tar.gz", folder_members(src))
    data_dir = tmp_path / "data"
    summary = D.prepare_dataset("cifar10", data_dir, from_archive=archive, download=False)
    assert "9 train / 6 test" in summary and "\n" not in summary
    assert (data_dir / "cifar10" / "train" / "cat").is_dir()
    assert (data_dir / "cifar10" / "decoded-cache.npz").is_file()
    assert not [p for p in (data_dir / "cifar10").iterdir() if p.name.startswith(".extract")
                or p.name.startswith(".archive")]
    # Idempotent: the second run neither extracts nor decodes.
    orig_extract, orig_decode = D._extract_cifar_archive, D.readers._decode_images
    D._extract_cifar_archive = D.readers._decode_images = None  # calling either would raise TypeError
    try:
        assert D.prepare_dataset("cifar10", data_dir, from_archive=archive, download=False) == summary
    finally:
        D._extract_cifar_archive, D.readers._decode_images = orig_extract, orig_decode


def test_prepare_reextracts_when_folder_removed_or_archive_changed(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, per_class=2, n_test=1)
    archive = make_tar(tmp_path / "c.tar.gz", folder_members(src))
    data_dir = tmp_path / "data"
    D.prepare_dataset("cifar10", data_dir, from_archive=archive, download=False)
    import shutil
    shutil.rmtree(data_dir / "cifar10" / "test")
    assert "6 train / 3 test" in D.prepare_dataset("cifar10", data_dir, from_archive=archive, download=False)
    make_image_folder(src, per_class=3, n_test=1)
    make_tar(archive, folder_members(src))
    os.utime(archive, (1, 1))  # a different size/mtime stamp
    assert "9 train / 3 test" in D.prepare_dataset("cifar10", data_dir, from_archive=archive, download=False)


def test_prepare_from_binary_archive(tmp_path):
    src = tmp_path / "src"
    make_cifar_binary(src / "cifar-10-batches-bin")
    archive = make_tar(tmp_path / "cifar-10-binary.tar.gz", folder_members(src))
    summary = D.prepare_dataset("cifar10", tmp_path / "data", from_archive=archive, download=False)
    assert "20 train / 6 test images, 10 classes" in summary
    assert (tmp_path / "data" / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").is_file()


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt", "train/../../evil.txt", "symlink", "hardlink",
                                 "fifo"])
def test_safe_extract_refuses(tmp_path, bad):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        ok = tarfile.TarInfo("train/cat/0.png")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        if bad in ("symlink", "hardlink", "fifo"):
            info = tarfile.TarInfo("train/cat/link")
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[bad]
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo(bad)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "dest"
    with pytest.raises(D.DataError, match="refusing"):
        D.safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # nothing landed, temp folder removed
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(D.DataError, match="refusing"):
        D.prepare_dataset("cifar10", tmp_path / "data", from_archive=archive, download=False)
    assert not (tmp_path / "data" / "cifar10" / "train").exists()


def test_prepare_bad_archives(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08" + b"\x00" * 50)
    with pytest.raises(D.DataError, match="cannot extract"):
        D.prepare_dataset("cifar10", tmp_path / "data", from_archive=junk, download=False)
    other = make_tar(tmp_path / "other.tar.gz", {"readme.txt": b"hi"})
    with pytest.raises(D.DataError, match="neither"):
        D.prepare_dataset("cifar10", tmp_path / "data", from_archive=other, download=False)
    with pytest.raises(D.DataError, match="does not exist"):
        D.prepare_dataset("cifar10", tmp_path / "data", from_archive=tmp_path / "nope.tar", download=False)
    with pytest.raises(D.DataError, match="cifar10 only"):
        D.prepare_dataset("fashion-mnist", tmp_path / "data", from_archive=other, download=False)


def test_cifar_download_via_file_url(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_cifar_binary(src / "cifar-10-batches-bin")
    archive = make_tar(tmp_path / "official.tar.gz", folder_members(src))
    monkeypatch.setattr(D.base, "CIFAR10_BINARY_URL", archive.as_uri())
    monkeypatch.setattr(D.base, "CIFAR10_BINARY_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = D.load_dataset("cifar10", tmp_path / "data", download=True)
    assert len(ds.train) == 20
    assert not (tmp_path / "data" / "cifar10" / "cifar-10-binary.tar.gz").exists()
    # A mismatching MD5 leaves neither the archive nor extracted files.
    monkeypatch.setattr(D.base, "CIFAR10_BINARY_MD5", "0" * 32)
    with pytest.raises(D.DataError, match="corrupted"):
        D.load_dataset("cifar10", tmp_path / "data2", download=True)
    assert list((tmp_path / "data2" / "cifar10").iterdir()) == []


# --------------------------------------------------------------------------------------------
# Real Debian Fashion-MNIST


@pytest.mark.skipif(not (D.SYSTEM_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_real_debian_fashion_mnist(tmp_path, no_network):
    ds = D.load_dataset("fashion-mnist", tmp_path, download=False)  # empty data_dir -> system files
    assert ds.source == str(D.SYSTEM_FASHION_MNIST_DIR)
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.classes == list(D.FASHION_MNIST_CLASSES)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    # Published statistics: mean 0.2860, std 0.3530 of the 0..1 pixels.
    assert ds.mean[0] / 255 == pytest.approx(0.2860, abs=1e-4)
    assert ds.std[0] / 255 == pytest.approx(0.3530, abs=1e-4)
    summary = D.prepare_dataset("fashion-mnist", tmp_path, download=False)
    assert "60000 train / 10000 test" in summary and "checksums verified" in summary
    # The content checksum was verified by load_dataset; check it independently too.
    for spec in D.base.FASHION_FILES.values():
        with gzip.open(D.SYSTEM_FASHION_MNIST_DIR / (spec.name + ".gz")) as f:
            assert hashlib.sha256(f.read()).hexdigest() == spec.sha256


# --------------------------------------------------------------------------------------------
# transform_batch


def _np_reference(x: np.ndarray, mean, std, pad_to: Optional[int], crop_pad: int, offsets, flips,
                  pad_mode: str = "zero"):
    """Straightforward per-sample numpy version of transform_batch (without resize)."""
    y = x.astype(np.float32).transpose(0, 3, 1, 2)
    b, c, h, w = y.shape
    if pad_to and h < pad_to:
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        y = np.pad(y, ((0, 0), (0, 0), (top, pad_to - h - top), (left, pad_to - w - left)))
        h = w = pad_to
    out = np.empty_like(y)
    for i in range(b):
        img = y[i]
        if crop_pad:
            p = np.pad(img, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad)),
                       mode="reflect" if pad_mode == "reflect" else "constant")
            dy, dx = offsets[i]
            img = p[:, dy:dy + h, dx:dx + w]
        if flips is not None and flips[i]:
            img = img[:, :, ::-1]
        out[i] = img
    m = np.asarray(mean, np.float32).reshape(1, c, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, c, 1, 1)
    return (out - m) / s


def test_transform_pad_and_normalize():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    out = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=(72.9,), std=(90.0,), pad_to=32, image_size=None)
    mx.nd.waitall()
    assert out.shape == (5, 1, 32, 32) and out.dtype == np.float32 and out.context == mx.cpu()
    got = out.asnumpy()
    np.testing.assert_allclose(got, _np_reference(x, (72.9,), (90.0,), 32, 0, None, None), rtol=1e-5, atol=1e-5)
    assert got[0, 0, 0, 0] == pytest.approx(-72.9 / 90.0)  # the pad is black before normalizing


def test_transform_crop_offsets_and_flips_exact():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    offsets = np.array([[0, 0], [8, 8], [0, 8], [8, 0], [3, 5], [4, 4]])
    flips = np.array([False, True, False, True, True, False])
    out = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=(0.0,), std=(1.0,), pad_to=32,
                            image_size=None, crop_pad=4, crop_offsets=offsets, flips=flips)
    ref = _np_reference(x, (0.0,), (1.0,), 32, 4, offsets, flips)
    np.testing.assert_array_equal(out.asnumpy(), ref)
    # Offset (4, 4) without flip is the identity of the padded image.
    np.testing.assert_array_equal(out.asnumpy()[5, 0, 2:30, 2:30], x[5, :, :, 0])


def test_transform_reflect_padded_crop_exact():
    """--augment-pad reflect (airbench94): the crop's border mirrors the image instead of black."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    offsets = np.array([[0, 0], [4, 4], [0, 4], [2, 1], [4, 0]])
    flips = np.array([True, False, False, True, False])
    out = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=(0.0,) * 3, std=(1.0,) * 3, pad_to=None,
                            image_size=None, crop_pad=2, crop_offsets=offsets, flips=flips, pad_mode="reflect")
    np.testing.assert_array_equal(out.asnumpy(), _np_reference(x, (0.0,) * 3, (1.0,) * 3, None, 2, offsets, flips,
                                                               pad_mode="reflect"))
    # Offset (0, 0): the top-left pixel is the image's pixel (2, 2), reflected over both edges.
    assert out.asnumpy()[0, :, 0, -1].tolist() == x[0, 2, 2, :].tolist()


def test_transform_rgb_crop_flip_normalize():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    offsets = rng.integers(0, 9, (4, 2))
    flips = np.array([True, False, True, False])
    out = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=mean, std=std, pad_to=32, image_size=None,
                            crop_pad=4, crop_offsets=offsets, flips=flips)
    np.testing.assert_allclose(out.asnumpy(), _np_reference(x, mean, std, None, 4, offsets, flips),
                               rtol=1e-5, atol=1e-5)
    only_flip = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=mean, std=std, pad_to=None,
                                  image_size=None, flips=flips)
    np.testing.assert_allclose(only_flip.asnumpy(), _np_reference(x, mean, std, None, 0, None, flips),
                               rtol=1e-5, atol=1e-5)


def test_transform_resize_28_to_224():
    x = np.full((2, 28, 28, 1), 200, np.uint8)
    x[1] = 10
    out = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=(10.0,), std=(2.0,), pad_to=32, image_size=224)
    assert out.shape == (2, 1, 224, 224) and out.dtype == np.float32
    got = out.asnumpy()
    np.testing.assert_allclose(got[0], 95.0, rtol=1e-5)  # constant image stays constant; no padding
    np.testing.assert_allclose(got[1], 0.0, atol=1e-5)
    rgb = D.transform_batch(mx.nd.array(np.zeros((3, 32, 32, 3), np.uint8), dtype=np.uint8), mean=(0, 0, 0),
                            std=(1, 1, 1), pad_to=None, image_size=64, crop_pad=4,
                            crop_offsets=np.zeros((3, 2), int), flips=np.array([True, False, True]))
    assert rgb.shape == (3, 3, 64, 64)
    mx.nd.waitall()


@pytest.mark.parametrize("crop_pad", [0, 3])
def test_transform_resize_matches_literal_order(crop_pad):
    """The resize path (flip/normalize moved before the resize) equals the documented order:
    resize -> crop -> flip -> normalize."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    flips = np.array([True, False, True, True])
    offsets = rng.integers(0, 2 * crop_pad + 1, (4, 2)) if crop_pad else None
    out = D.transform_batch(mx.nd.array(x, dtype=np.uint8), mean=mean, std=std, pad_to=None, image_size=48,
                            crop_pad=crop_pad, crop_offsets=offsets, flips=flips)
    resized = mx.nd.contrib.BilinearResize2D(mx.nd.array(x.transpose(0, 3, 1, 2).astype(np.float32)),
                                             height=48, width=48).asnumpy()
    ref = _np_reference(resized.transpose(0, 2, 3, 1), mean, std, None, crop_pad, offsets, flips)
    np.testing.assert_allclose(out.asnumpy(), ref, rtol=1e-4, atol=1e-4)


def test_transform_rejects_bad_offsets():
    with pytest.raises(ValueError):
        D.transform_batch(mx.nd.zeros((1, 4, 4, 1), dtype=np.uint8), mean=(0,), std=(1,), pad_to=None,
                          image_size=None, crop_pad=1, crop_offsets=np.array([[3, 0]]))


# --------------------------------------------------------------------------------------------
# BatchLoader


def _split(n: int = 50, hw: int = 28, c: int = 1) -> D.Split:
    # Pixel value encodes the sample index, so every output sample can be traced back.
    images = np.zeros((n, hw, hw, c), np.uint8)
    images[:] = (np.arange(n) % 256).reshape(n, 1, 1, 1)
    return D.Split(images, np.arange(n, dtype=np.int32) % 10)


def _loader(split, **kw):
    args = {"batch_size": 8, "ctx_list": [mx.cpu()], "mean": (0.0,), "std": (1.0,), "pad_to": 32,
            "image_size": None, "train": True, "augment_crop_pad": 4, "augment_flip": True, "seed": 3}
    args.update(kw)
    return D.BatchLoader(split, args.pop("batch_size"), args.pop("ctx_list"), **args)


def _collect(loader, epoch, start=0) -> List[np.ndarray]:
    out = []
    for data, labels in loader.epoch(epoch, start):
        out.append((np.concatenate([d.asnumpy() for d in data]), np.concatenate([lab.asnumpy() for lab in labels])))
    mx.nd.waitall()
    return out


def test_loader_determinism_and_resume():
    split = _split()
    a, b = _loader(split), _loader(split)
    assert len(a) == 6 and a.num_samples == 48  # 50 // 8 full batches
    e1, e1b, e2 = _collect(a, 1), _collect(b, 1), _collect(a, 2)
    assert len(e1) == 6
    for (x1, y1), (x2, y2) in zip(e1, e1b):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert any(not np.array_equal(p[1], q[1]) for p, q in zip(e1, e2))  # a new epoch reshuffles
    tail = _collect(a, 1, start=4)
    assert len(tail) == 2
    for (x1, y1), (x2, y2) in zip(tail, e1[4:]):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x, y = e1[0]
    assert x.shape == (8, 1, 32, 32) and x.dtype == np.float32 and y.dtype == np.float32
    # Labels travel with their images (pixel value = sample index, label = index % 10).
    centre = x[:, 0, 16, 16]
    np.testing.assert_array_equal(centre % 10, y)
    seen = np.concatenate([b[0][:, 0, 16, 16] for b in e1])
    assert len(set(seen.tolist())) == 48  # no sample twice in an epoch


def test_loader_augmentation_reproduces_rng_stream():
    """The loader's crops/flips are exactly default_rng([seed, epoch]) applied by transform_batch."""
    rng = np.random.default_rng(0)
    split = D.Split(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.zeros(16, np.int32))
    loader = _loader(split, batch_size=16, mean=(1, 2, 3), std=(4, 5, 6), pad_to=None)
    got = _collect(loader, 7)[0][0]
    r = np.random.default_rng([3, 7])
    perm = r.permutation(16)
    offsets = r.integers(0, 9, size=(16, 2))
    flips = r.random(16) < 0.5
    ref = _np_reference(split.images[perm], (1, 2, 3), (4, 5, 6), None, 4, offsets, flips)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_loader_eval_keeps_last_and_no_augmentation():
    split = _split(n=21)
    loader = _loader(split, train=False)
    assert len(loader) == 3 and loader.num_samples == 21
    batches = _collect(loader, 0)
    assert [len(y) for _, y in batches] == [8, 8, 5]
    x = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(x[:, 0, 16, 16], np.arange(21))  # fixed order
    np.testing.assert_array_equal(x[:, 0, 0, 0], 0)  # padding only: the border is the black pad
    np.testing.assert_array_equal(x[:, 0, 2:30, 2:30], np.broadcast_to(np.arange(21).reshape(21, 1, 1), (21, 28, 28)))


def test_loader_two_contexts():
    split = _split(n=40, hw=32, c=3)
    ctxs = [mx.cpu(0), mx.cpu(1)]
    loader = _loader(split, batch_size=9, ctx_list=ctxs, mean=(0, 0, 0), std=(1, 1, 1), train=False)
    batches = list(loader.epoch(0))
    assert len(batches) == 5
    for data, labels in batches[:4]:
        assert [d.shape[0] for d in data] == [4, 5]  # split_and_load(even_split=False) sizes
        assert [d.context for d in data] == ctxs and [lab.context for lab in labels] == ctxs
        assert all(d.dtype == np.float32 and lab.dtype == np.float32 for d, lab in zip(data, labels))
    last_data, _ = batches[4]
    assert [d.shape[0] for d in last_data] == [2, 2]
    flat = np.concatenate([d.asnumpy()[:, 0, 5, 5] for data, _ in batches for d in data])
    np.testing.assert_array_equal(flat, np.arange(40))
    train = _loader(split, batch_size=8, ctx_list=ctxs, mean=(0, 0, 0), std=(1, 1, 1))
    data, labels = next(train.epoch(0))
    assert [d.shape for d in data] == [(4, 3, 32, 32)] * 2
    mx.nd.waitall()
    with pytest.raises(D.DataError, match="smaller than the number of devices"):
        _loader(split, batch_size=1, ctx_list=ctxs)


def test_loader_last_eval_batch_smaller_than_devices():
    loader = _loader(_split(n=9), batch_size=4, ctx_list=[mx.cpu(0), mx.cpu(1)], train=False)
    data, _ = list(loader.epoch(0))[-1]
    assert len(data) == 1 and data[0].shape[0] == 1


def test_loader_shards_are_disjoint():
    split = _split(n=50)
    shards = [_loader(split, batch_size=4, shard=(r, 3)) for r in range(3)]
    assert {len(s) for s in shards} == {4}  # 50 // 3 = 16 per worker -> 4 batches each
    seen = [np.concatenate([b[0][:, 0, 16, 16] for b in _collect(s, 5)]) for s in shards]
    sets = [set(s.tolist()) for s in seen]
    assert all(len(s) == 16 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # Eval shards cover everything exactly once.
    ev = [_loader(split, train=False, shard=(r, 3)) for r in range(3)]
    got = sorted(np.concatenate([b[0][:, 0, 16, 16] for s in ev for b in _collect(s, 0)]).tolist())
    assert got == list(range(50))
    with pytest.raises(D.DataError, match="shard"):
        _loader(split, shard=(3, 3))


def test_loader_too_small_for_a_batch():
    with pytest.raises(D.DataError, match="fewer than one batch"):
        _loader(_split(n=5), batch_size=8)
    with pytest.raises(ValueError):
        next(_loader(_split(n=16)).epoch(0, start_batch=-1))
    assert list(_loader(_split(n=16)).epoch(0, start_batch=5)) == []


def test_loader_resize_224():
    loader = _loader(_split(n=4), batch_size=2, image_size=224, train=False)
    (data,), _ = next(loader.epoch(0))
    assert data.shape == (2, 1, 224, 224)
    mx.nd.waitall()
