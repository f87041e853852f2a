"""What a new user meets in the first hour (issue 13): each test fails on the defect it names."""
from __future__ import annotations

import json
import math

import pytest
from conftest import invoke_cli, tiny_args

from vgg_gluon.config import RunConfig

TINY = tiny_args(train_limit=None)


# ------------------------------------------------------------------------------------------------
# 1. schedules of any length >= 1 step
@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
@pytest.mark.parametrize("epochs,warmup,iters", [(1, 0, 1), (1, 0.5, 1), (2, 1, 1), (1, 0.5, 2), (3, 2, 1),
                                                 (1, 0, 2), (2, 0.3, 3)])
def test_schedule_defined_for_any_number_of_steps(schedule, epochs, warmup, iters):
    from vgg_gluon.optim import make_lr_scheduler
    cfg = RunConfig(epochs=epochs, warmup_epochs=warmup, lr=0.1, lr_schedule=schedule, lr_steps=[1])
    s = make_lr_scheduler(cfg, iters)
    values = [s(t) for t in range(epochs * iters + 2)]
    assert all(math.isfinite(v) and 0 <= v <= 0.1 + 1e-12 for v in values)


def test_one_step_after_warmup_takes_the_peak_rate():
    """Warmup 1 epoch of 1 step, then 1 cosine step: 0 (warmup's first value), then the peak."""
    from vgg_gluon.optim import make_lr_scheduler
    s = make_lr_scheduler(RunConfig(epochs=2, warmup_epochs=1, lr=0.1), 1)
    assert [s(0), s(1)] == [0.0, 0.1]


def test_longer_schedules_keep_gluoncvs_values():
    """The one-step fix must not move a single value of a normal schedule."""
    from gluoncv.utils import LRScheduler, LRSequential

    from vgg_gluon.optim import make_lr_scheduler
    cfg = RunConfig(epochs=8, warmup_epochs=0.5, lr=0.1)
    ours = make_lr_scheduler(cfg, 469)
    ref = LRSequential([LRScheduler("linear", base_lr=0.0, target_lr=0.1, nepochs=0.5, iters_per_epoch=469),
                        LRScheduler("cosine", base_lr=0.1, target_lr=0.0, nepochs=7.5, iters_per_epoch=469)])
    for t in (0, 1, 100, 234, 235, 236, 1000, 2000, 3751):
        assert ours(t) == ref(t)


@pytest.mark.parametrize("extra", [["--epochs", "1"], ["--epochs", "2", "--warmup-epochs", "1"]])
def test_tiny_smoke_runs_finish_and_resume(tmp_path, cli_env, extra):
    """The issue's commands: 128 images at batch 128 = 1 step per epoch."""
    r = invoke_cli("train", "--train-limit", "128", "--test-limit", "64", "--width", "0.125", "-q",
                   "--output-dir", tmp_path, "--name", "smoke", *extra)
    assert r.exit_code == 0, r.output
    hist = (tmp_path / "smoke" / "history.csv").read_text().splitlines()
    assert len(hist) == 1 + int(extra[1])
    r = invoke_cli("resume", tmp_path / "smoke", "--epochs", str(int(extra[1]) + 1), "-q")
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------------
# 8. bad values: exit 2, naming the option as typed; a bad value in a file: exit 1, naming the file
@pytest.mark.parametrize("args, option", [
    (["--width", "-1"], "--width"), (["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--dropout", "1.5"], "--dropout"), (["--lr-steps", "a,b"], "--lr-steps"),
    (["--lr-schedule", "step", "--lr-steps", "5,2"], "--lr-steps"), (["--momentum", "1"], "--momentum"),
    (["--name", "a/b"], "--name"), (["--epochs", "1", "--warmup-epochs", "2"], "--warmup-epochs"),
])
def test_bad_values_exit_2_naming_the_option(args, option, cli_env, tmp_path):
    r = invoke_cli("train", *args, "--output-dir", tmp_path)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and f"'{option}'" in errors[0], r.output
    assert "_" not in errors[0].split(":")[1], r.output   # no Python field names in the option part
    assert not any(tmp_path.iterdir())


def test_bad_value_in_a_recipe_file_exits_1_naming_the_file(cli_env, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("width: -1\n")
    r = invoke_cli("train", "--config", recipe)
    assert r.exit_code == 1 and f"{recipe}: width must be positive" in r.output, r.output


def test_typed_option_against_a_file_value_is_named(cli_env, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 4\n")
    r = invoke_cli("train", "--config", recipe, "--warmup-epochs", "5")
    assert r.exit_code == 2 and "Invalid value for '--warmup-epochs': must be less than epochs (4)" in r.output, \
        r.output


# ------------------------------------------------------------------------------------------------
# 10. one set of defaults per data set: bare flags = experiments/<dataset>.yaml = the Makefile's
@pytest.mark.parametrize("dataset, yaml_name", [("fashion-mnist", "fashion_mnist.yaml"), ("cifar10", "cifar10.yaml")])
def test_bare_flags_get_the_data_sets_recipe(dataset, yaml_name):
    from conftest import REPO

    from vgg_gluon.cli import resolve_config
    from_yaml = resolve_config(str(REPO / "experiments" / yaml_name), {})
    from_flags = resolve_config(None, {"dataset": dataset})
    assert from_flags.to_dict() == from_yaml.to_dict()


def test_quick_trial_of_a_recipe_keeps_its_warmup_share():
    from vgg_gluon.cli import resolve_config
    from vgg_gluon.config import RECIPES
    cfg = resolve_config(None, {"dataset": "cifar10", "epochs": 1})
    r = RECIPES["cifar10"]
    assert cfg.warmup_epochs == pytest.approx(r["warmup_epochs"] / r["epochs"])


# ------------------------------------------------------------------------------------------------
# 7. a mid-epoch checkpoint is named after the epoch it belongs to; old names are still read
def _stop_after(monkeypatch, n_calls):
    from vgg_gluon import cli
    calls = {"n": 0}

    def stop(self):
        calls["n"] += 1
        return calls["n"] >= n_calls
    monkeypatch.setattr(cli.StopFlag, "__call__", stop)
    monkeypatch.setattr(cli.StopFlag, "signum", 2, raising=False)


def test_mid_epoch_checkpoint_named_after_its_epoch(tmp_path, cli_env, monkeypatch):
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import cli
    _stop_after(monkeypatch, 6)   # 4 steps per epoch (+1 check at its end): stops in epoch 2 after step 1
    r = invoke_cli("train", *TINY, "--train-limit", "256", "--epochs", "3", "--output-dir", tmp_path, "--name", "r")
    assert r.exit_code == 130, r.output
    run = tmp_path / "r"
    assert "stopped in epoch 2 after step 1" in r.output and "epoch-0002-step-00001" in r.output, r.output
    assert (run / "epoch-0002-step-00001").is_dir()
    c = ck.select_checkpoint(run, "last")
    assert (c.epoch, c.step) == (1, 1)
    monkeypatch.setattr(cli.StopFlag, "__call__", lambda self: False)
    r = invoke_cli("resume", run)
    assert r.exit_code == 0 and "(epoch 2, step 1)" in r.output, r.output
    from vgg_gluon.report import read_history
    assert [row["epoch"] for row in read_history(run / "history.csv")] == [1, 2, 3]


def test_old_mid_epoch_names_still_resume(tmp_path, cli_env, monkeypatch):
    """A folder written before the rename (epoch-0001-step-00001 = inside epoch 2) resumes at epoch 2."""
    import json as _json

    from vgg_gluon import checkpoint as ck
    from vgg_gluon import cli
    _stop_after(monkeypatch, 6)
    r = invoke_cli("train", *TINY, "--train-limit", "256", "--epochs", "3", "--output-dir", tmp_path, "--name", "r")
    assert r.exit_code == 130, r.output
    run = tmp_path / "r"
    (run / "epoch-0002-step-00001").rename(run / "epoch-0001-step-00001")
    last = _json.loads((run / "last.json").read_text())
    (run / "last.json").write_text(_json.dumps(dict(last, checkpoint="epoch-0001-step-00001")))
    c = ck.select_checkpoint(run, "last")
    assert (c.name, c.epoch, c.step) == ("epoch-0001-step-00001", 1, 1)
    assert [(x.epoch, x.step) for x in ck.list_checkpoints(run)] == [(1, 0), (1, 1)]
    monkeypatch.setattr(cli.StopFlag, "__call__", lambda self: False)
    r = invoke_cli("resume", run)
    assert r.exit_code == 0 and "(epoch 2, step 1)" in r.output, r.output
    assert (run / "epoch-0003").is_dir()


# ------------------------------------------------------------------------------------------------
# 4. every figure names its split; "best" with --val-split is the validation choice everywhere
def test_validation_best_is_labelled_everywhere(tmp_path, cli_env):
    from vgg_gluon import report
    log = tmp_path / "log.jsonl"
    r = invoke_cli("train", *TINY, "--train-limit", "256", "--val-split", "0.25", "--epochs", "3",
                   "--output-dir", tmp_path, "--name", "v", "--log-json", log)
    assert r.exit_code == 0, r.output
    run = tmp_path / "v"
    hist = report.read_history(run / "history.csv")
    best = max(hist, key=lambda h: (h["val_acc"], -h["epoch"]))
    end = [json.loads(ln) for ln in log.read_text().splitlines()][-1]
    assert end["event"] == "end" and end["best_split"] == "val" and end["best_epoch"] == best["epoch"]
    assert end["best_acc"] == pytest.approx(best["val_acc"]) and end["best_test_acc"] == pytest.approx(best["test_acc"])
    assert end["last_test_acc"] == pytest.approx(hist[-1]["test_acc"])
    pointer = json.loads((run / "best.json").read_text())
    assert pointer["epoch"] == best["epoch"] and pointer["val_acc"] == pytest.approx(best["val_acc"])
    md = (run / "report.md").read_text()
    assert f"Best epoch {best['epoch']}, chosen on validation accuracy: val accuracy {best['val_acc']:.4f}" in md
    r = invoke_cli("runs", "--dir", tmp_path, "--json")
    row = json.loads(r.output)[0]
    assert (row["best_split"], row["best_epoch"]) == ("val", best["epoch"])
    r = invoke_cli("evaluate", run, "--json")
    assert json.loads(r.output)["epoch"] == best["epoch"]
    # the validation split again, from the command line: the same images, the same accuracy
    r = invoke_cli("evaluate", run, "--which", "last", "--split", "val", "--json")
    out = json.loads(r.output)
    assert (out["split"], out["epoch"], out["samples"]) == ("val", 3, 64), out
    assert out["accuracy"] == pytest.approx(hist[-1]["val_acc"], abs=1e-9)
    assert "fashion-mnist val (" in invoke_cli("evaluate", run, "--split", "val").output


@pytest.mark.parametrize("how", ["run", "params"])
def test_evaluate_split_val_needs_a_validation_split(run_dir, cli_env, how):
    target = [run_dir] if how == "run" else ["--params", str(run_dir / "epoch-0002" / "model.params")]
    r = invoke_cli("evaluate", *target, "--split", "val")
    assert r.exit_code == 2 and "--split val" in r.output and "--val-split" in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_done_line_names_the_split_and_warns_on_test_selection():
    from vgg_gluon.cli import done_line
    from vgg_gluon.report import best_summary
    rows = [{"epoch": 1, "test_acc": 0.5, "val_acc": 0.7}, {"epoch": 2, "test_acc": 0.6, "val_acc": 0.65}]
    assert done_line(best_summary(rows)) == ("done: last epoch (2) test accuracy 0.6000; best epoch 1 by validation "
                                             "accuracy 0.7000 (test accuracy 0.5000)")
    rows = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6}, {"epoch": 3, "test_acc": 0.55}]
    assert done_line(best_summary(rows)) == ("done: last epoch (3) test accuracy 0.5500; best epoch 2 by test "
                                             "accuracy 0.6000 (chosen on the test set)")


def test_train_warns_that_best_is_chosen_on_test(tmp_path, cli_env):
    r = invoke_cli("train", *tiny_args(train_limit=128, quiet=False), "--epochs", "1", "--output-dir", tmp_path)
    assert r.exit_code == 0 and "no --val-split, so the 'best' checkpoint is chosen on test accuracy" in r.output


def test_curves_have_whole_epoch_ticks_and_no_negative_rate(tmp_path):
    from vgg_gluon import report
    captured = {}
    import matplotlib.figure
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        captured["axes"] = [(ax.get_xticks().tolist(), ax.get_ylim()) for ax in self.axes]
        return orig(self, *a, **k)
    matplotlib.figure.Figure.savefig = spy
    try:
        report.plot_curves(tmp_path / "c.png", [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5,
                                                  "test_acc": 0.4, "lr": 0.0}])
    finally:
        matplotlib.figure.Figure.savefig = orig
    for ticks, _ in captured["axes"]:
        assert all(float(t).is_integer() for t in ticks), ticks
    assert captured["axes"][2][1][0] == 0   # LR panel starts at 0


# ------------------------------------------------------------------------------------------------
# a small finished run shared by the command tests below
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data_dir):
    out = tmp_path_factory.mktemp("runs")
    r = invoke_cli("train", *TINY, "--train-limit", "256", "--epochs", "2", "--output-dir", out, "--name", "run",
                   data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output
    return out / "run"


# 2. the export reproduces predict for every image kind predict accepts
def _odd_images(folder):
    """An EXIF-rotated JPEG, a 16-bit PNG, a palette PNG and an RGBA PNG, none of them 28 px."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir()
    base = np.zeros((40, 20), np.uint8)
    base[5:35, 3:8] = 220   # an asymmetric shape: a rotation changes the pixels
    base[30:35, 3:17] = 180
    exif = Image.Exif()
    exif[0x0112] = 6        # orientation: rotate 90 degrees when shown
    Image.fromarray(base).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 255, (33, 33, 3)).astype(np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 255, (26, 26, 4)).astype(np.uint8), "RGBA").save(folder / "alpha.png")
    return sorted(folder.iterdir())


def test_export_reproduces_predict_for_every_image_kind(run_dir, tmp_path, cli_env):
    import os
    import subprocess
    import sys
    files = _odd_images(tmp_path / "imgs")
    r = invoke_cli("predict", run_dir, *files, "--top-k", "10", "--json")
    assert r.exit_code == 0, r.output
    ours = {p["file"]: {t["class"]: t["probability"] for t in p["top"]} for p in json.loads(r.output)["predictions"]}
    out = tmp_path / "export"
    assert invoke_cli("export", run_dir, out).exit_code == 0
    proc = subprocess.run([sys.executable, "-I", str(out / "serve_example.py"), "--json", *map(str, files)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""), cwd=str(tmp_path),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    served = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(served) == len(files)
    for s in served:
        for name, p in s["probabilities"].items():
            assert p == pytest.approx(ours[s["file"]][name], abs=1e-5), (s["file"], name)


def test_exif_rotation_and_16_bit_decoding(tmp_path):
    import numpy as np
    from PIL import Image

    from vgg_gluon.inspection import decode_image
    files = {f.name: f for f in _odd_images(tmp_path / "imgs")}
    with Image.open(files["rotated.jpg"]) as im:
        assert im.size == (20, 40)   # stored portrait; EXIF orientation 6 shows it rotated
        want = np.asarray(im.transpose(Image.Transpose.ROTATE_270).convert("L").resize((28, 28), Image.BILINEAR))
        unrotated = np.asarray(im.convert("L").resize((28, 28), Image.BILINEAR))
    got = decode_image(files["rotated.jpg"], 1, 28)[..., 0]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, unrotated)
    deep = decode_image(files["deep.png"], 1, 28)
    assert deep.std() > 40   # 16-bit noise keeps its grey levels (convert("L") alone clips to ~2 levels)


# 3. the hint after stopping a distributed run
def test_stop_hint_of_a_distributed_run_goes_through_the_launcher(monkeypatch):
    from types import SimpleNamespace

    from vgg_gluon.cli import resume_hint
    monkeypatch.setenv("DMLC_NUM_SERVER", "2")
    hint = resume_hint("checkpoints/d", SimpleNamespace(num_workers=3))
    assert "`vgg-gluon launch -n 3 -s 2 -- resume checkpoints/d`" in hint
    assert "`vgg-gluon resume checkpoints/d --kvstore device`" in hint
    assert resume_hint("checkpoints/d") == "Continue with `vgg-gluon resume checkpoints/d`"


# 5. evaluate RUN refuses settings; its help lists no training-only option
@pytest.mark.parametrize("args", [["--dataset", "cifar10"], ["--arch", "vgg19"], ["--width", "0.5"],
                                  ["--no-batch-norm"], ["--image-size", "64"]])
def test_evaluate_run_refuses_settings(run_dir, cli_env, args):
    r = invoke_cli("evaluate", run_dir, *args)
    assert r.exit_code == 2 and "applies to --params FILE" in r.output, r.output


def test_evaluate_help_has_no_training_options():
    r = invoke_cli("evaluate", "--help")
    for opt in ("--augment", "--val-split", "--train-limit", "--dropout", "--hybridize", "--epochs"):
        assert opt not in r.output


# 6. what --params inferred and mapped: said once, without -v
def test_params_inference_is_said_once(run_dir, cli_env):
    params = run_dir / "epoch-0002" / "model.params"
    r = invoke_cli("-v", "evaluate", "--params", params, "--json", mix_stderr=False)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("inferred") == 1 and "width 0.0625" in r.stderr and "fc 32" in r.stderr
    assert r.stderr.count("loaded") == 1
    r = invoke_cli("evaluate", "--params", params, "--json", mix_stderr=False)
    assert r.stderr.count("inferred") == 1 and r.stderr.count("loaded") == 1


def test_resume_params_run_line_shows_fc(run_dir, cli_env, tmp_path):
    params = run_dir / "epoch-0002" / "model.params"
    r = invoke_cli("resume", "--params", params, "--epochs", "1", "--train-limit", "128", "--test-limit", "64",
                   "--batch-size", "64", "--output-dir", tmp_path, "--name", "p")
    assert r.exit_code == 0, r.output
    assert "width 0.0625 +BN fc 32" in r.output and "inferred" in r.output


# 9. a --data-dir that does not exist is an error, not a silent fall-back
@pytest.mark.parametrize("cmd", [["train"], ["evaluate", "RUN"]])
def test_missing_data_dir_is_refused(run_dir, cli_env, tmp_path, cmd):
    args = [run_dir if a == "RUN" else a for a in cmd]
    r = invoke_cli(*args, "--data-dir", tmp_path / "nope", "--output-dir" if cmd == ["train"] else "--json",
                   *([tmp_path / "out"] if cmd == ["train"] else []))
    assert r.exit_code == 2 and "'--data-dir'" in r.output and "no such folder" in r.output, r.output
    assert not (tmp_path / "out").exists()


# 11. small things
def test_evaluate_into_a_closed_pipe_is_quiet(run_dir, tiny_data_dir):
    import os
    import subprocess
    import sys

    from conftest import REPO
    env = dict(os.environ, VGG_GLUON_DATA_DIR=str(tiny_data_dir), PYTHONPATH=str(REPO))
    proc = subprocess.run(f"{sys.executable} -m vgg_gluon evaluate {run_dir} | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "Broken pipe" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_verbose_after_the_command_says_where_it_goes(run_dir, cli_env):
    r = invoke_cli("evaluate", run_dir, "-v")
    assert r.exit_code == 2 and "vgg-gluon -v evaluate" in r.output


def test_export_refuses_to_overwrite_without_force(run_dir, cli_env, tmp_path):
    out = tmp_path / "e"
    assert invoke_cli("export", run_dir, out).exit_code == 0
    before = (out / "model-0000.params").stat().st_mtime_ns
    r = invoke_cli("export", run_dir, out)
    assert r.exit_code == 1 and "--force" in r.output
    assert (out / "model-0000.params").stat().st_mtime_ns == before
    assert invoke_cli("export", run_dir, out, "--force").exit_code == 0


def test_runs_of_a_missing_folder_is_an_error(tmp_path):
    r = invoke_cli("runs", "--dir", tmp_path / "nope")
    assert r.exit_code == 1 and "no such folder" in r.output


def test_evaluate_reads_no_training_images(run_dir, cli_env, monkeypatch):
    from vgg_gluon.data import readers
    seen = []
    orig = readers._read_idx
    monkeypatch.setattr(readers, "_read_idx", lambda p, *a: seen.append(p.name) or orig(p, *a))
    assert invoke_cli("evaluate", run_dir, "--json").exit_code == 0
    assert seen and not any(n.startswith("train") for n in seen), seen


# 12. top-5 and per-class counts
def test_evaluate_reports_top5_and_class_counts(run_dir, cli_env):
    r = invoke_cli("evaluate", run_dir, "--json")
    out = json.loads(r.output)
    assert out["top_k"] == 5 and out["accuracy"] <= out["top5_accuracy"] <= 1
    assert sum(out["per_class_count"].values()) == out["samples"] == 64
    assert out["split"] == "test"
    text = invoke_cli("evaluate", run_dir).output
    assert "top-5" in text and "images)" in text


def test_top5_counts_the_right_class(tmp_path):
    """engine.evaluate's top-5 against numpy on the same logits."""
    import mxnet as mx
    import numpy as np

    from vgg_gluon import engine
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 50)

    class Loader:
        def epoch(self, e):
            yield [mx.nd.array(logits)], [mx.nd.array(labels)]
    res = engine.evaluate(mx.gluon.nn.HybridLambda(lambda F, x: x), Loader(), 10)
    want = np.mean([labels[i] in np.argsort(-logits[i])[:5] for i in range(50)])
    assert res["top5_acc"] == pytest.approx(want) and res["acc"] == pytest.approx(np.mean(logits.argmax(1) == labels))


# issue 11's two bugs: evaluate honours --batch-size, predict/export/report honour --ctx
def test_evaluate_batch_size_is_honoured(run_dir, cli_env, monkeypatch):
    from vgg_gluon import engine
    sizes = []
    orig = engine.build_session

    def spy(*a, **k):
        s = orig(*a, **k)
        sizes.append(s.eval_loader.batch_size)
        return s
    monkeypatch.setattr(engine, "build_session", spy)
    assert invoke_cli("evaluate", run_dir, "--batch-size", "16", "--json").exit_code == 0
    assert sizes == [16]


@pytest.mark.parametrize("cmd", ["predict", "export", "report"])
def test_tools_honour_ctx(run_dir, cli_env, tmp_path, monkeypatch, cmd):
    from vgg_gluon import inspection
    extra = {"predict": [tmp_path / "x.png"], "export": [tmp_path / "exp", "--force"], "report": []}[cmd]
    if cmd == "predict":
        from PIL import Image
        Image.new("L", (28, 28)).save(tmp_path / "x.png")
    used = []
    orig = inspection.load_run_model

    def spy(*a, **k):
        m = orig(*a, **k)
        used.append(str(m.ctx))
        return m
    monkeypatch.setattr(inspection, "load_run_model", spy)
    r = invoke_cli(cmd, run_dir, *extra, "--ctx", "cpu:1")
    assert r.exit_code == 0, r.output
    assert used == ["cpu(1)"]
    r = invoke_cli(cmd, run_dir, *extra, "--ctx", "tpu")
    assert r.exit_code != 0 and "tpu" in r.output


# 12. TensorBoard: the event file read back
def _read_events(folder):
    import struct

    from tensorboardX.proto import event_pb2
    events = []
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):   # TFRecord: length, crc, payload, crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return events


def test_tensorboard_writes_scalars_graph_and_mistakes(tmp_path, cli_env):
    from vgg_gluon import report
    tb = tmp_path / "tb"
    r = invoke_cli("train", *TINY, "--train-limit", "256", "--epochs", "2", "--log-interval", "2",
                   "--output-dir", tmp_path, "--name", "r", "--tensorboard", tb)
    assert r.exit_code == 0, r.output
    events = _read_events(tb)
    scalars = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
    hist = report.read_history(tmp_path / "r" / "history.csv")
    assert [s for s, _ in scalars["epoch/test_acc"]] == [1, 2]
    for (_, got), row in zip(scalars["epoch/test_acc"], hist):
        assert got == pytest.approx(row["test_acc"], abs=1e-6)
    assert [s for s, _ in scalars["step/loss"]] == [2, 4, 6, 8]   # 4 steps per epoch, every 2nd
    assert {"step/acc", "step/lr", "step/img_per_s", "epoch/train_loss", "epoch/lr"} <= set(scalars)
    graphs = [e for e in events if e.graph_def]
    assert len(graphs) == 1
    from tensorboardX.proto.graph_pb2 import GraphDef
    ops = {n.op for n in GraphDef.FromString(graphs[0].graph_def).node}
    assert {"Convolution", "BatchNorm", "Pooling", "FullyConnected"} <= ops
    images = [v for e in events for v in e.summary.value if v.tag == "mistakes"]
    assert len(images) == 1 and images[0].image.width > 100


def test_refused_resume_of_a_pre_lock_run_creates_nothing(run_dir, cli_env, tmp_path):
    """A run folder without .lock (from before the lock existed): a refused resume adds no file."""
    import shutil
    run = tmp_path / "old"
    shutil.copytree(run_dir, run)
    (run / ".lock").unlink(missing_ok=True)
    before = sorted(p.name for p in run.iterdir())
    r = invoke_cli("resume", run, "--lr", "0.5")
    assert r.exit_code == 2
    assert sorted(p.name for p in run.iterdir()) == before


def test_second_trainer_of_a_run_is_refused_by_the_folder_lock(run_dir, tmp_path):
    """The lock is the run folder's own flock: a second holder is refused, naming the pid."""
    import subprocess
    import sys

    from vgg_gluon import checkpoint as ck
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(run_dir)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('locked', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ck.CheckpointError, match=f"in use by another vgg-gluon process \\(pid {holder.pid}\\)"):
            with ck.run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with ck.run_lock(run_dir):   # free again once the holder is gone
        pass
