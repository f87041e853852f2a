"""What the data sets are: names, classes, official files and checksums, where Debian keeps them;
and the arrays they are read into (Split, Dataset), with DataError for every problem with them.
Constants are read through this module at call time, so tests can point them elsewhere."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from vgg_gluon.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - hints only
    pass

log = logging.getLogger(__name__)

__all__ = ["CIFAR10_BINARY_DIR", "CIFAR10_BINARY_MD5", "CIFAR10_BINARY_URL", "CIFAR10_CLASSES",
           "CIFAR10_RECORD", "DATASET_NAMES", "DataError", "Dataset", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_URL", "IdxFile", "SYSTEM_FASHION_MNIST_DIR", "Split", "canonical_name",
           "default_data_dir", "input_shape", "native_size", "num_channels"]


DATASET_NAMES = ("fashion-mnist", "cifar10")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# Debian's `dataset-fashion-mnist`; a module attribute so tests can point it elsewhere.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_BINARY_DIR = "cifar-10-batches-bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class IdxFile:
    """One official Fashion-MNIST file: its name, the .gz MD5 of the official download,
    and the SHA-256 and item count of the *decompressed* content."""

    name: str
    gz_md5: str
    sha256: str
    count: int


# The SHA-256 values are of the decompressed bytes (computed from Debian's package, whose .gz
# containers differ from the official ones but whose content is bit-identical), so they verify
# both Debian's files and official downloads; the MD5s check the official .gz as downloaded.
FASHION_FILES: Dict[str, IdxFile] = {
    "train-images": IdxFile("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                             "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 60000),
    "train-labels": IdxFile("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe",
                             "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60000),
    "test-images": IdxFile("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79",
                            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 10000),
    "test-labels": IdxFile("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310",
                            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10000),
}



class DataError(UserError):
    """One-line, user-facing message that says what is wrong and how to get the data."""


@dataclass
class Split:
    """Images and labels of one split."""

    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """A loaded data set: uint8 splits plus what the model and the report need to know."""

    name: str
    train: Split
    test: Split
    val: Optional[Split]
    classes: List[str]
    mean: Tuple[float, ...]  # per channel, 0..255 units, of the training split used
    std: Tuple[float, ...]
    source: str


# --------------------------------------------------------------------------------------------
# Names, sizes, locations


def canonical_name(name: str) -> str:
    """Map user spellings ("fashion_mnist", "CIFAR-10") to one of DATASET_NAMES."""
    key = name.strip().lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    if key not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    return key


def default_data_dir() -> Path:
    """$VGG_GLUON_DATA_DIR if set, else ./data (absolute, for clear messages)."""
    env = os.environ.get("VGG_GLUON_DATA_DIR")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def native_size(name: str) -> int:
    """Side the network sees without resizing: 32 for both (Fashion-MNIST's 28 is zero-padded)."""
    canonical_name(name)
    return 32


def num_channels(name: str) -> int:
    """1 for Fashion-MNIST, 3 for CIFAR-10."""
    return 1 if canonical_name(name) == "fashion-mnist" else 3


def input_shape(name: str, image_size: Optional[int]) -> Tuple[int, int, int]:
    """(C, H, W) the network sees: native size (32) unless resized to image_size."""
    side = int(image_size) if image_size else native_size(name)
    return (num_channels(name), side, side)
