"""Visual report (after training and `vgg-gluon report`), `vgg-gluon runs`, --log-json, progress ETA."""
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import invoke_cli, tiny_args
from PIL import Image

from vgg_gluon import cli
from vgg_gluon.runs import MARKER

TINY = tiny_args(train_limit=128)


def _invoke(*args, **kw):
    return invoke_cli(*args, mix_stderr=False, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data_dir):
    """A finished two-epoch run, trained with --log-json."""
    out = tmp_path_factory.mktemp("runs")
    r = _invoke("train", *TINY, "--epochs", 2, "--output-dir", out, "--name", "run",
                "--log-json", out / "log.jsonl", data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output + r.stderr
    return out / "run"


def _check_png(path, min_w, min_h):
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_w and h >= min_h, (path.name, im.size)
        a = np.asarray(im.convert("RGB"), dtype=np.int16)
    # not blank: many distinct colours and real contrast
    assert a.std() > 10, path.name
    packed = (a[..., 0].astype(np.int32) << 16) | (a[..., 1].astype(np.int32) << 8) | a[..., 2]
    assert len(np.unique(packed)) > 20, path.name


def test_training_writes_the_report(run):
    assert not (run / MARKER).exists()
    for name, (w, h) in {"curves.png": (800, 250), "confusion.png": (400, 400), "mistakes.png": (300, 150)}.items():
        _check_png(run / name, w, h)
    md = (run / "report.md").read_text()
    for name in ("curves.png", "confusion.png", "mistakes.png", "Per-class accuracy", "Ankle boot"):
        assert name in md
    # one table row per class, with a count of 64 test images in total
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln.count("|") == 5 and "class" not in ln]
    assert len(rows) == 10 and sum(int(r.split("|")[2]) for r in rows) == 64
    assert "report:" in (run / "train.log").read_text()


def test_report_command_rewrites_everything(run, cli_env, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for name in ("curves.png", "confusion.png", "mistakes.png", "report.md"):
        (copy / name).unlink()
    r = _invoke("report", copy, "--which", "last")
    assert r.exit_code == 0, r.output + r.stderr
    for name in ("curves.png", "confusion.png", "mistakes.png"):
        _check_png(copy / name, 300, 150)
    assert "epoch-0002" in (copy / "report.md").read_text()


def test_report_failure_never_stops_training(cli_env, tmp_path, monkeypatch):
    from vgg_gluon import inspection

    def boom(*a, **k):
        raise RuntimeError("plotting exploded")
    monkeypatch.setattr(inspection, "report_after_training", boom)
    r = _invoke("train", *TINY, "--epochs", 1, "--output-dir", tmp_path, "--name", "r", "--log-json", "-")
    assert r.exit_code == 0, r.output + r.stderr
    assert "warning: report not written (RuntimeError: plotting exploded)" in r.stderr
    assert (tmp_path / "r" / "epoch-0001").is_dir()
    # --log-json -: stdout carries only JSON lines; the human lines went to stderr
    events = [json.loads(ln) for ln in r.output.splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "end"]
    assert events[0]["run"] == str(tmp_path / "r") and events[0]["config"]["width"] == 0.0625
    assert events[2]["status"] == "finished" and "epoch   1/1" in (tmp_path / "r" / "train.log").read_text()


def test_log_json_file(run):
    events = [json.loads(ln) for ln in (run.parent / "log.jsonl").read_text().splitlines()][1:]
    assert [e["event"] for e in events] == ["epoch", "epoch", "end"]
    assert [e["epoch"] for e in events[:2]] == [1, 2]
    for e in events[:2]:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "img_per_s", "best"} <= set(e)
        assert e["epochs"] == 2
    assert events[0]["eta_seconds"] > 0 and events[1]["eta_seconds"] == 0
    log = [ln for ln in (run / "train.log").read_text().splitlines() if " epoch " in ln]
    assert re.search(r"epoch   1/2 .* eta \d+s$", log[0]) and " eta " not in log[1], log


def _age(path, seconds):
    t = time.time() - seconds
    for p in [path, *path.iterdir()]:
        os.utime(p, (t, t))


def test_runs_lists_states_newest_first(run, tmp_path):
    parent = tmp_path / "checkpoints"
    parent.mkdir()
    shutil.copytree(run, parent / "finished")
    # stopped by Ctrl-C inside epoch 2: last.json points to a mid-epoch checkpoint
    stopped = parent / "stopped"
    shutil.copytree(run, stopped)
    last = json.loads((stopped / "last.json").read_text())
    (stopped / "last.json").write_text(json.dumps(dict(last, checkpoint="epoch-0001-step-00001", epoch=1, step=1)))
    # crashed: killed during a save (a .tmp- leftover), long ago
    crashed = parent / "crashed"
    shutil.copytree(run, crashed)
    (crashed / "config.yaml").write_text((crashed / "config.yaml").read_text().replace("epochs: 2", "epochs: 5"))
    (crashed / ".tmp-epoch-0003-999").mkdir()
    # no clean end, no training process: crashed; the training process (marker) alive: running;
    # the marker's process gone (SIGKILL, OOM): crashed
    quiet = parent / "quiet"
    shutil.copytree(run, quiet)
    (quiet / "config.yaml").write_text((quiet / "config.yaml").read_text().replace("epochs: 2", "epochs: 5"))
    busy, killed = parent / "busy", parent / "killed"
    shutil.copytree(quiet, busy)
    shutil.copytree(quiet, killed)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # vgg_gluon train"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for folder, pid in ((busy, trainer.pid), (killed, dead.pid)):
            (folder / MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        (parent / "not-a-run").mkdir()
        for i, p in enumerate([killed, quiet, crashed, stopped, parent / "finished"]):
            _age(p, 3600 * (5 - i))
        r = _invoke("runs", "--dir", parent, "--json")
    finally:
        trainer.kill()
        trainer.wait()
    assert r.exit_code == 0, r.output + r.stderr
    rows = json.loads(r.output)
    assert [x["name"] for x in rows] == ["busy", "finished", "stopped", "crashed", "quiet", "killed"]
    state = {x["name"]: x["state"] for x in rows}
    assert state == {"busy": "running", "finished": "finished", "stopped": "stopped", "crashed": "crashed",
                     "quiet": "crashed", "killed": "crashed"}
    assert "is gone" in rows[-1]["note"] and ".tmp-" in rows[3]["note"]
    fin = rows[1]
    assert fin["dataset"] == "fashion-mnist" and fin["arch"] == "vgg11"
    assert fin["epochs_done"] == 2 and fin["epochs_planned"] == 2
    assert 0 <= fin["last_test_acc"] <= fin["best_test_acc"] <= 1
    text = _invoke("runs", "--dir", parent)
    assert text.exit_code == 0
    lines = text.output.splitlines()
    assert lines[0].split()[:3] == ["run", "dataset", "architecture"]
    assert len(lines) == 7 and "2/2" in lines[2] and "finished" in lines[2] and "vgg11 x0.0625 +BN" in lines[2]
    (tmp_path / "none").mkdir()
    assert _invoke("runs", "--dir", tmp_path / "none").output.startswith("no run folders")
    r = _invoke("runs", "--dir", tmp_path / "missing")
    assert r.exit_code == 1 and "no such folder" in r.stderr


def test_summary_of_a_run(run):
    r = _invoke("summary", run, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    s = json.loads(r.output)
    assert s["input_shape"] == [1, 1, 32, 32] and s["fc_units"] == 32 and s["rows"][-1]["output_shape"] == [1, 10]
    params = sum(int(np.prod(p.shape)) for p in _net_params(run))
    assert s["total_params"] == params


def _net_params(run):
    from vgg_gluon.inspection import load_run_model
    net = load_run_model(run, "last").net
    return [p for p in net.collect_params().values() if p.grad_req != "null"]


def test_progress_bar_shows_eta(monkeypatch):
    from vgg_gluon.engine import Progress
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    c = cli.Console(quiet=False)
    c.use_bar = True
    c.progress(Progress(1, 20, 100, 0.5, 0.8, 1000.0, 0.1))
    time.sleep(0.05)
    c.progress(Progress(1, 40, 100, 0.4, 0.85, 1000.0, 0.1))
    c.close_bar()
    out = buf.getvalue()
    assert re.search(r"40/100 \[\d\d:\d\d<\d\d:\d\d", out), out   # elapsed<remaining
    assert "loss 0.4000" in out and "img/s" in out


def test_training_crash_is_logged_and_listed(cli_env, tmp_path, monkeypatch):
    from vgg_gluon import engine

    seen = []

    def boom(*a, **k):
        marker = json.loads((tmp_path / "c" / MARKER).read_text())  # written while training
        seen.append(marker["pid"] == os.getpid() and marker["host"] == socket.gethostname())
        raise RuntimeError("device fell off the bus")
    monkeypatch.setattr(engine, "train_one_epoch", boom)
    r = _invoke("train", *TINY, "--epochs", 1, "--output-dir", tmp_path, "--name", "c")
    assert r.exit_code == 1 and seen == [True]
    run = tmp_path / "c"
    assert not (run / MARKER).exists()  # removed however training ends (but a kill)
    assert "Error: training crashed: RuntimeError: device fell off the bus" in (run / "train.log").read_text()
    rows = json.loads(_invoke("runs", "--dir", tmp_path, "--json").output)
    assert rows[0]["state"] == "crashed" and "device fell off the bus" in rows[0]["note"]


def test_report_md_says_which_figures_used_test_time_augmentation(tmp_path):
    """The report's own evaluation is one view per image; the run's per-epoch figure may be a TTA
    one. report.md names each, so 0.9369 beside a run's 0.9387 does not read as a contradiction."""
    from vgg_gluon import report
    confusion = [[9, 1], [2, 8]]
    kw = dict(run_name="r", classes=["a", "b"], confusion=confusion, checkpoint_name="epoch-0002", epoch=2,
              images=[], dataset="cifar10", mistakes=3)
    rows = [{"epoch": 1, "test_acc": 0.80, "tta": "flip-translate"},
            {"epoch": 2, "test_acc": 0.875, "tta": "flip-translate"}]
    report.write_report_md(tmp_path / "tta.md", history=rows, **kw)
    md = (tmp_path / "tta.md").read_text()
    assert "test accuracy **0.8500** on 20 images (one view each, no test-time augmentation)" in md
    assert "last epoch's test accuracy 0.8750 (test-time augmentation flip-translate)." in md
    plain = [{k: v for k, v in r.items() if k != "tta"} for r in rows]
    report.write_report_md(tmp_path / "plain.md", history=plain, **kw)
    assert "last epoch's test accuracy 0.8750. Best epoch 2" in (tmp_path / "plain.md").read_text()
