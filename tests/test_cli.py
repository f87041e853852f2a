"""The command line as a user meets it: help, one-line errors, evaluate output."""
import json
import os
import stat

import pytest
from conftest import EXIT_INPUT, EXIT_USAGE, invoke_cli, one_line_error, tiny_args

TINY = tiny_args(train_limit=128)


def _invoke(*args, **kw):
    return invoke_cli(*args, **kw)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data_dir):
    out = tmp_path_factory.mktemp("runs")
    r = _invoke("train", *TINY, "--epochs", 2, "--output-dir", out, "--name", "run", data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output
    return out / "run"


def test_help_lists_commands_and_examples():
    r = _invoke("--help")
    assert r.exit_code == 0
    for word in ("train", "resume", "evaluate", "data", "Examples"):
        assert word in r.output
    for cmd in ("train", "resume", "evaluate", "data"):
        sub = _invoke(cmd, "--help")
        assert sub.exit_code == 0 and "Examples" in sub.output


def test_version():
    r = _invoke("--version")
    assert r.exit_code == 0 and "vgg-gluon" in r.output


def test_run_folder_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "history.csv", "train.log", "curves.png", "last.json", "best.json",
            "epoch-0001", "epoch-0002"} <= names
    assert (trained_run / "curves.png").stat().st_size > 5000


def test_evaluate_text_and_json(trained_run, cli_env):
    r = _invoke("evaluate", trained_run)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "per-class accuracy" in r.output and "confusion matrix" in r.output
    assert "Ankle boot" in r.output
    r = _invoke("evaluate", trained_run, "--which", "last", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["epoch"] == 2 and out["samples"] == 64 and 0 <= out["accuracy"] <= 1
    assert len(out["confusion"]) == 10 and sum(map(sum, out["confusion"])) == 64
    assert set(out["per_class_accuracy"]) == set(out["classes"])


def test_evaluate_bare_params(trained_run, cli_env):
    params = trained_run / "epoch-0002" / "model.params"
    r = _invoke("evaluate", "--params", params, "--dataset", "fashion-mnist", "--test-limit", 64, "--json",
                mix_stderr=False)
    assert r.exit_code == 0, r.output   # width/BN/fc units inferred from the file (said on stderr)
    assert json.loads(r.stdout)["samples"] == 64


def test_resume_from_bare_params_starts_new_run(trained_run, cli_env, tmp_path):
    params = trained_run / "epoch-0002" / "model.params"
    r = _invoke("resume", "--params", params, "--dataset", "fashion-mnist", *TINY, "--epochs", 3,
                "--start-epoch", 2, "--output-dir", tmp_path, "--name", "fromparams")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fromparams" / "epoch-0003").is_dir()
    assert not (tmp_path / "fromparams" / "epoch-0001").exists()


@pytest.mark.parametrize("args, code, words", [
    (["train", "--dataset", "mnist"], EXIT_USAGE, ["mnist"]),
    (["train", "--arch", "vgg12"], EXIT_USAGE, ["vgg12"]),
    (["train", "--ctx", "tpu"], EXIT_USAGE, ["unknown context 'tpu'"]),
    (["train", "--ctx", "gpu:0"], EXIT_INPUT, ["GPU"]),
    (["train", "--epochs", "0"], EXIT_USAGE, ["'--epochs': must be positive"]),
    (["train", "--batch-size", "-4"], EXIT_USAGE, ["'--batch-size': must be positive"]),
    (["train", "--lr", "-1"], EXIT_USAGE, ["'--lr': must be positive"]),
    (["train", "--image-size", "8"], EXIT_USAGE, ["8"]),
    (["train", "--config", "nonexistent.yaml"], EXIT_USAGE, ["nonexistent.yaml"]),
    (["resume"], EXIT_USAGE, ["either a run folder or --params"]),
    (["resume", "/no/such/run"], EXIT_INPUT, ["no such run folder"]),
    (["evaluate", "/no/such/run"], EXIT_INPUT, ["no such run folder"]),
    (["resume", "--params", "/no/such.params", "--dataset", "cifar10"], EXIT_INPUT, ["no such file"]),
    (["traim"], EXIT_USAGE, ["traim"]),
])
def test_bad_input_is_one_line(args, code, words, cli_env):
    one_line_error(_invoke(*args), code, *words)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_GLUON_DATA_DIR", str(tmp_path / "empty"))
    r = _invoke("train", "--dataset", "cifar10", "--epochs", 1)
    one_line_error(r, EXIT_INPUT)
    assert "cifar" in r.output.lower()


def test_resume_refuses_changing_the_model(trained_run, cli_env):
    one_line_error(_invoke("resume", trained_run, "--width", "0.5"), EXIT_USAGE, "--width cannot change")


def test_existing_run_name_is_not_overwritten(trained_run, cli_env):
    before = sorted(p.name for p in trained_run.iterdir())
    r = _invoke("train", *TINY, "--epochs", 1, "--output-dir", trained_run.parent, "--name", "run")
    one_line_error(r, EXIT_INPUT, "already exists")
    assert sorted(p.name for p in trained_run.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path, cli_env):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    one_line_error(_invoke("train", *TINY, "--epochs", 1, "--output-dir", ro), EXIT_INPUT, "not writable")


def test_corrupt_checkpoint_falls_back_with_message(trained_run, cli_env, tmp_path, caplog):
    """The warning itself (that it reaches a terminal without -v: test_faults, in a subprocess)."""
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "epoch-0002" / "model.params").write_bytes(b"\0" * 10)
    r = _invoke("evaluate", run, "--which", "last", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[-1])["epoch"] == 1
    warned = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert str(run / "epoch-0002" / "model.params") in warned[0] and "corrupted" in warned[0]
    assert warned[0].endswith("using the previous complete checkpoint epoch-0001"), warned[0]


def _tutorial_vgg(ratio: int, fc: int, flatten: bool = True):
    """The seed tutorial's Gluon VGG-11 (nn.Sequential blocks in name_scope, Conv2D with relu,
    MaxPool2D, [Flatten], Dense, Dropout, Dense, Dropout, Dense), narrowed by `ratio`."""
    from mxnet.gluon import nn
    net = nn.Sequential()
    with net.name_scope():
        for num, channels in [(1, 64), (1, 128), (2, 256), (2, 512), (2, 512)]:
            blk = nn.Sequential()
            with blk.name_scope():
                for _ in range(num):
                    blk.add(nn.Conv2D(channels // ratio, kernel_size=3, padding=1, activation="relu"))
                blk.add(nn.MaxPool2D(pool_size=2, strides=2))
            net.add(blk)
        if flatten:
            net.add(nn.Flatten())
        net.add(nn.Dense(fc, activation="relu"), nn.Dropout(0.5), nn.Dense(fc, activation="relu"),
                nn.Dropout(0.5), nn.Dense(10))
    return net


@pytest.mark.parametrize("flatten", [True, False])
def test_resume_from_tutorial_params_file(tmp_path, cli_env, flatten):
    import mxnet as mx
    net = _tutorial_vgg(ratio=16, fc=64, flatten=flatten)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 32, 32)))
    path = tmp_path / "TinyVGG11.params"
    net.save_parameters(str(path))
    r = _invoke("resume", "--params", path, "--dataset", "fashion-mnist", "--arch", "vgg11",
                *tiny_args(train_limit=128, model=False), "--epochs", 1, "--output-dir", tmp_path, "--name", "tut")
    assert r.exit_code == 0, r.output
    assert "tutorial" in r.output.lower() or "mapped" in r.output.lower(), r.output
    cfg = (tmp_path / "tut" / "config.yaml").read_text()
    assert "width: 0.0625" in cfg and "batch_norm: false" in cfg and "fc_units: 64" in cfg
    assert (tmp_path / "tut" / "epoch-0001" / "MANIFEST.json").is_file()


def test_tutorial_params_with_wrong_flags_name_first_mismatch(tmp_path, cli_env):
    import mxnet as mx
    net = _tutorial_vgg(ratio=16, fc=64)
    net.initialize()
    net(mx.nd.zeros((1, 1, 32, 32)))
    path = tmp_path / "t.params"
    net.save_parameters(str(path))
    r = _invoke("resume", "--params", path, "--dataset", "fashion-mnist", "--width", "0.25",
                *tiny_args(train_limit=128, model=False), "--epochs", 1, "--output-dir", tmp_path)
    one_line_error(r, EXIT_INPUT, "t.params", "shape")
