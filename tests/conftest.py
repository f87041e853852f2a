"""Shared fixtures: tiny data sets written in the real file formats, so no test needs the network."""
from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

# Same thread settings the package applies, before anything imports mxnet.
import vgg_gluon  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w))
        f.write(images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)))
        f.write(labels.astype(np.uint8).tobytes())


def make_patterns(n: int, seed: int, size: int = 28, channels: int = 0):
    """Learnable images: each class is a bright bar at its own position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    shape = (n, size, size) if not channels else (n, size, size, channels)
    images = rng.integers(0, 60, shape).astype(np.uint8)
    for i, c in enumerate(labels):
        r = 2 + int(c) * (size - 4) // 10
        images[i, r:r + 2, 2:size - 2] = 230
    return images, labels


def write_fashion(dirpath: Path, n_train: int = 256, n_test: int = 64) -> Path:
    d = dirpath / "fashion-mnist"
    d.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = make_patterns(n_train, 1)
    te_x, te_y = make_patterns(n_test, 2)
    write_idx_images(d / "train-images-idx3-ubyte.gz", tr_x)
    write_idx_labels(d / "train-labels-idx1-ubyte.gz", tr_y)
    write_idx_images(d / "t10k-images-idx3-ubyte.gz", te_x)
    write_idx_labels(d / "t10k-labels-idx1-ubyte.gz", te_y)
    return dirpath


TINY_WIDTH = 0.0625   # 64 -> 4 channels: a VGG-11 step takes milliseconds at 32 px
TINY_FC = 32
# A seconds-long run on `tiny_data_dir` (256 train / 64 test images): VGG-11 at 1/16 width with 32
# dense units, batches of 64 (4 steps per epoch). tiny_args() spells it as flags.
# The classic row: the data sets' default recipes are fast rows (config.RECIPES), and the tests of
# the plumbing keep the network they were written for (a classic row gets config.CLASSIC_RECIPES).
TINY_RUN = {"arch": "vgg11", "width": TINY_WIDTH, "fc_units": TINY_FC, "batch_size": 64, "train_limit": 256,
            "test_limit": 64}


def tiny_args(*, batch_size=64, train_limit=256, test_limit=64, log_interval=None, quiet=True,
              model=True, **more) -> list:
    """TINY_RUN as command-line flags. A value of None leaves that flag out; `more` adds flags
    (`epochs=2` -> `--epochs 2`, `no_batch_norm=True` -> `--no-batch-norm`). model=False leaves out
    --arch, --width and --fc-units (for runs whose network comes from a file)."""
    values = {"arch": TINY_RUN["arch"] if model else None,
              "width": TINY_RUN["width"] if model else None, "fc_units": TINY_RUN["fc_units"] if model else None,
              "batch_size": batch_size, "train_limit": train_limit, "test_limit": test_limit,
              "log_interval": log_interval, **more}
    args = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args + (["--quiet"] if quiet else [])


def engine_run(run_dir: Path, *, stop_after=None, on_progress=None, **settings):
    """A run of TINY_RUN + `settings` trained in this process by the engine (engine.fit), without the
    command line: the folder `vgg-gluon train` leaves (config.yaml, checkpoints, history). With
    stop_after=n it stops as Ctrl-C stops a run, when fit has asked its stop check n times (after
    every step, and at every epoch end). Settings resolve as on the command line (the data set's
    recipe under them). Returns fit's result."""
    import itertools

    from vgg_gluon import checkpoint, cli, engine
    cfg = cli.resolve_config(None, {**TINY_RUN, "run_name": Path(run_dir).name,
                                    "output_dir": str(Path(run_dir).parent), **settings})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    calls = itertools.count(1)
    stop = (lambda: next(calls) >= stop_after) if stop_after else None
    with checkpoint.run_lock(run_dir):
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        return engine.fit(engine.build_session(cfg), run_dir, on_progress=on_progress, should_stop=stop)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data folder holding a 256/64-image Fashion-MNIST in the official idx.gz format."""
    return write_fashion(tmp_path_factory.mktemp("data"))


@pytest.fixture
def cli_env(tiny_data_dir, monkeypatch):
    monkeypatch.setenv("VGG_GLUON_DATA_DIR", str(tiny_data_dir))
    return tiny_data_dir


def invoke_cli(*args, data_dir=None, mix_stderr=True, **kw):
    """Run the CLI in this process (click's CliRunner); `data_dir` sets VGG_GLUON_DATA_DIR for the call only."""
    from click.testing import CliRunner

    from vgg_gluon import cli
    env = {"VGG_GLUON_DATA_DIR": str(data_dir)} if data_dir is not None else None
    return CliRunner(mix_stderr=mix_stderr).invoke(cli.main, [str(a) for a in args], env=env, **kw)


# The README's exit codes: 1 a problem with input, data, files or devices; 2 bad usage (click's own
# checks, and a bad value of an option).
EXIT_INPUT, EXIT_USAGE = 1, 2


def one_line_error(r, code: int, *words) -> str:
    """A refused command (CliRunner result) as the README promises: exit `code`, exactly one
    `Error:` line, holding every one of `words`, and no traceback. Returns that line."""
    assert r.exit_code == code, f"exit {r.exit_code}, expected {code}:\n{r.output}"
    out = r.output + (r.stderr if not r.runner.mix_stderr else "")
    assert "Traceback" not in out, out
    errs = [ln for ln in out.splitlines() if ln.startswith("Error")]
    assert len(errs) == 1, out
    for w in words:
        assert w in errs[0], out
    return errs[0]


def run_cli(*args, env_extra=None, timeout=600, check=True):
    """Run `python -m vgg_gluon ...` in a real subprocess."""
    import subprocess
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "vgg_gluon", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
