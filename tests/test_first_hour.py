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
