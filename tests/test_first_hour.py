"""What a new user meets in the first hour (issue 13): each test fails on the defect it names."""
from __future__ import annotations

import json
import math

import pytest
from conftest import invoke_cli

from vgg_gluon.config import RunConfig

TINY = ["--width", "0.0625", "--fc-units", "32", "--batch-size", "64", "--test-limit", "64", "--quiet"]


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
