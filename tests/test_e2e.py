"""Slow end-to-end runs in real subprocesses on small subsets of the real data sets (CI runs them)."""
import json
import os
from pathlib import Path

import pytest
from conftest import FASHION_SYSTEM, REPO, run_cli, tiny_args

pytestmark = pytest.mark.slow

# The classic row (its recipe: experiments/*_vgg11.yaml): the plumbing these runs test was written
# for it; test_default_recipe_on_the_real_data runs the data sets' own (fast3) recipes.
SMALL = ["--arch", "vgg11", "--width", "0.125", "--train-limit", "1024", "--test-limit", "512", "--batch-size", "64",
         "--quiet"]


def _data_dir() -> Path:
    return Path(os.environ.get("VGG_GLUON_DATA_DIR", REPO / "data"))


def _cycle(tmp_path, dataset, extra=()):
    env = {"VGG_GLUON_DATA_DIR": str(_data_dir())}
    run = tmp_path / "run"
    run_cli("train", "--dataset", dataset, *SMALL, *extra, "--epochs", 1, "--output-dir", tmp_path,
            "--name", "run", env_extra=env)
    assert (run / "epoch-0001" / "MANIFEST.json").is_file()
    run_cli("resume", run, "--epochs", 2, env_extra=env)
    assert (run / "epoch-0002" / "MANIFEST.json").is_file()
    out = json.loads(run_cli("evaluate", run, "--which", "last", "--json", env_extra=env).stdout)
    assert out["epoch"] == 2 and out["samples"] == 512
    return out


def _fashion_mnist_found() -> bool:
    """Where the program looks: the data folder (its fashion-mnist/ or itself), then Debian's copy."""
    d = _data_dir()
    return any((folder / name).is_file() for folder in (d / "fashion-mnist", d, FASHION_SYSTEM)
               for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"))


@pytest.mark.skipif(not _fashion_mnist_found(),
                    reason="Fashion-MNIST is neither in the data folder nor installed (make data installs it)")
def test_fashion_mnist_train_resume_evaluate(tmp_path):
    # The plumbing on the real files, not the recipe: the data set's recipe (lr 0.1 with a warmup
    # sized for 469 steps per epoch) is too hot for 16 steps of a 1/8-width net (10.9% once on CI).
    out = _cycle(tmp_path, "fashion-mnist", extra=("--lr", "0.05", "--warmup-epochs", "0"))
    assert out["accuracy"] > 0.2   # 2 short epochs on 1,024 images: well above chance (0.1)


def test_cifar10_train_resume_evaluate(tmp_path):
    d = _data_dir()
    if not ((d / "cifar10").exists() or (d / "cifar-10-batches-bin").exists()):
        pytest.skip(f"CIFAR-10 not prepared in {d} (make data)")
    # CIFAR-10 starts slower than Fashion-MNIST: 1,024 images with the recipe's crop/flip, dropout 0.5
    # and cosine gave 12.7% after 2 epochs on CI; 4,096 gave 15-19%. This setting keeps the recipe's
    # augmentation (random crop with 4 px padding, horizontal flip) on 8,192 images, without dropout,
    # at a constant rate: measured 32.4-38.1% over seeds 1-3 (35.7-40.4% without the augmentation).
    out = _cycle(tmp_path, "cifar10", extra=("--train-limit", "8192", "--dropout", "0",
                                             "--lr", "0.05", "--lr-schedule", "constant"))
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "augment_crop: 4" in cfg and "augment_flip: true" in cfg
    assert out["accuracy"] > 0.2   # chance is 0.1; 512 test images: 0.2 is 10 standard errors above it


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_default_recipe_on_the_real_data(tmp_path, dataset):
    """The data set's default recipe as `make train` runs it (fast3 at half width, whitening,
    lookahead, alternating flip, flip-translate TTA), shortened to 2 epochs of 4,096 images: it
    learns, resumes, and every figure says it used TTA."""
    d = _data_dir()
    if dataset == "cifar10" and not ((d / "cifar10").exists() or (d / "cifar-10-batches-bin").exists()):
        pytest.skip(f"CIFAR-10 not prepared in {d} (make data)")
    if dataset == "fashion-mnist" and not _fashion_mnist_found():
        pytest.skip("Fashion-MNIST is neither in the data folder nor installed (make data installs it)")
    env = {"VGG_GLUON_DATA_DIR": str(d)}
    run = tmp_path / "run"
    run_cli("train", "--dataset", dataset, "--train-limit", 4096, "--test-limit", 512, "--epochs", 1, "--quiet",
            "--output-dir", tmp_path, "--name", "run", env_extra=env)
    run_cli("resume", run, "--epochs", 2, env_extra=env)
    cfg = (run / "config.yaml").read_text()
    assert "arch: fast3" in cfg and "whiten: true" in cfg and "lookahead: true" in cfg
    out = json.loads(run_cli("evaluate", run, "--which", "last", "--json", env_extra=env).stdout)
    assert out["epoch"] == 2 and out["tta"] == "flip-translate"
    assert (run / "history.csv").read_text().splitlines()[-1].endswith("flip-translate")
    assert out["accuracy"] > 0.3, out["accuracy"]   # chance is 0.1


def test_signal_stops_cleanly_and_resumes(tmp_path, tiny_data_dir):
    """SIGTERM mid-training: exit 143, one consistent checkpoint, resume finishes the run."""
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, VGG_GLUON_DATA_DIR=str(tiny_data_dir), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "vgg_gluon", "train", *tiny_args(batch_size=16, train_limit=None, test_limit=None),
           "--epochs", "30", "--output-dir", str(tmp_path), "--name", "sig"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    run = tmp_path / "sig"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "last.json").exists():
        time.sleep(0.2)
    assert (run / "last.json").exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "vgg-gluon resume" in err
    run_cli("resume", run, "--epochs", 3, env_extra={"VGG_GLUON_DATA_DIR": str(tiny_data_dir)})
    assert json.loads((run / "last.json").read_text())["epoch"] == 3
