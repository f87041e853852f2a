"""The best epoch: a run whose best and last checkpoints differ, and every command checked against it.

The run is made to get worse on purpose: 3 epochs on the tiny data set, then `resume --epochs 4
--data-dir` a copy whose training labels are shifted by one class, so epoch 4 unlearns what
epochs 1-3 learnt (test accuracy measured here: 42 or 34 of 64 after epoch 3, 16 or 9 after
epoch 4). The test set is the same in both folders.
"""
import json
import shutil

import numpy as np
import pytest
from conftest import invoke_cli, make_patterns, tiny_args, write_idx_labels
from PIL import Image

from vgg_gluon import report

RATE = ["--lr", "0.05", "--lr-schedule", "constant", "--warmup-epochs", "0"]


def _invoke(*args, **kw):
    return invoke_cli(*args, mix_stderr=False, **kw)


@pytest.fixture(scope="module")
def worse_run(tmp_path_factory, tiny_data_dir):
    out = tmp_path_factory.mktemp("best")
    shifted = out / "shifted"
    shutil.copytree(tiny_data_dir / "fashion-mnist", shifted / "fashion-mnist")
    _, labels = make_patterns(256, 1)          # conftest.write_fashion's training set
    write_idx_labels(shifted / "fashion-mnist" / "train-labels-idx1-ubyte.gz", (labels + 1) % 10)
    r = _invoke("train", *tiny_args(), *RATE, "--epochs", 3, "--output-dir", out, "--name", "run",
                data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output + r.stderr
    r = _invoke("resume", out / "run", "--epochs", 4, "--data-dir", shifted, data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output + r.stderr
    run = out / "run"
    hist = report.read_history(run / "history.csv")
    accs = [h["test_acc"] for h in hist]
    best = int(np.argmax(accs)) + 1             # the first of equals: a later tie is no improvement
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4] and best < 4 and accs[3] < accs[best - 1], accs
    return run, best, accs


def _pointer(run, which):
    return json.loads((run / f"{which}.json").read_text())["checkpoint"]


def test_pointers_and_best_acc_survive_resume(worse_run):
    """best.json names the first epoch of the highest test accuracy, also across a resume (which
    must start from the saved best_acc, not from nothing)."""
    run, best, accs = worse_run
    assert _pointer(run, "best") == f"epoch-{best:04d}"
    assert _pointer(run, "last") == "epoch-0004"
    meta = json.loads((run / "epoch-0004" / "meta.json").read_text())
    assert meta["best_acc"] == pytest.approx(max(accs), abs=1e-12)
    lines = (run / "train.log").read_text().splitlines()
    starred = [int(ln.split("epoch")[1].split("/")[0]) for ln in lines if "*best" in ln]
    assert starred and starred[-1] == best and 4 not in starred


def test_evaluate_best_and_last(worse_run, cli_env):
    run, best, accs = worse_run
    for which, epoch in (("best", best), ("last", 4)):
        r = _invoke("evaluate", run, "--which", which, "--json")
        assert r.exit_code == 0, r.output + r.stderr
        out = json.loads(r.output)
        assert out["epoch"] == epoch and out["accuracy"] == pytest.approx(accs[epoch - 1], abs=1e-12), which


def test_runs_lists_best_and_last(worse_run):
    run, best, accs = worse_run
    r = _invoke("runs", "--dir", run.parent, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    row, = [x for x in json.loads(r.output) if x["name"] == "run"]
    assert row["best_checkpoint"] == f"epoch-{best:04d}" and row["last_checkpoint"] == "epoch-0004"
    assert (row["best_split"], row["best_epoch"], row["last_epoch"]) == ("test", best, 4)
    assert row["best_test_acc"] == pytest.approx(max(accs)) and row["last_test_acc"] == pytest.approx(accs[3])
    assert row["state"] == "finished" and row["epochs_done"] == 4


def test_predict_best_and_last(worse_run, tmp_path):
    """predict --which best|last: the share of the 64 test images it gets right is that epoch's
    test accuracy (the same pixels, the same network)."""
    run, best, accs = worse_run
    images, labels = make_patterns(64, 2)       # conftest.write_fashion's test set
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(im, "L").save(files[-1])
    for which, epoch in (("best", best), ("last", 4)):
        r = _invoke("predict", run, *files, "--which", which, "--top-k", 1, "--json")
        assert r.exit_code == 0, r.output + r.stderr
        preds = json.loads(r.output)["predictions"]
        right = sum(p["top"][0]["index"] == int(y) for p, y in zip(preds, labels))
        assert right / 64 == pytest.approx(accs[epoch - 1], abs=1e-12), which


def test_report_best_and_last(worse_run, cli_env):
    run, best, accs = worse_run
    md = (run / "report.md").read_text()      # written when the run finished: the best checkpoint
    assert f"checkpoint `epoch-{best:04d}` (epoch {best}): test accuracy **{accs[best - 1]:.4f}**" in md
    assert f"last epoch's test accuracy {accs[3]:.4f}. Best epoch {best}, chosen on test accuracy" in md
    r = _invoke("report", run, "--which", "last")
    assert r.exit_code == 0, r.output + r.stderr
    md = (run / "report.md").read_text()
    assert f"checkpoint `epoch-0004` (epoch 4): test accuracy **{accs[3]:.4f}**" in md


def test_val_split_chooses_best_on_validation(tmp_path):
    """With --val-split, "best" is the epoch of the highest validation accuracy. Here the test
    labels are shifted by five classes, so the test accuracy falls while the validation accuracy
    rises (measured: test 7, 0, 0 of 64; validation 7, 18, 29 of 64)."""
    from conftest import write_fashion
    data = write_fashion(tmp_path / "data")
    _, labels = make_patterns(64, 2)
    write_idx_labels(data / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz", (labels + 5) % 10)
    r = _invoke("train", *tiny_args(), *RATE, "--epochs", 3, "--val-split", 0.25, "--output-dir", tmp_path,
                "--name", "val", data_dir=data)
    assert r.exit_code == 0, r.output + r.stderr
    run = tmp_path / "val"
    hist = report.read_history(run / "history.csv")
    val, test = [h["val_acc"] for h in hist], [h["test_acc"] for h in hist]
    assert np.argmax(val) != np.argmax(test), (val, test)
    assert _pointer(run, "best") == f"epoch-{int(np.argmax(val)) + 1:04d}"
    meta = json.loads((run / "epoch-0003" / "meta.json").read_text())
    assert meta["best_acc"] == pytest.approx(max(val), abs=1e-12)
