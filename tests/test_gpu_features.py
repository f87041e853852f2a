"""GPU-oriented options (--amp, --dtype float16) exercised as far as a CPU allows."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_args

from vgg_gluon import _env, cli
from vgg_gluon.config import RunConfig

TINY = tiny_args(train_limit=128, epochs=1)


def test_float16_and_amp_on_cpu_are_one_line_errors(tmp_path, cli_env, monkeypatch):
    """float16 needs a GPU; --amp on a CPU means bfloat16, refused without bfloat16 kernels and,
    where it measured slower, with BatchNorm (TINY has BatchNorm)."""
    r = CliRunner().invoke(cli.main, ["train", *TINY, "--ctx", "cpu", "--output-dir", str(tmp_path),
                                      "--dtype", "float16"])
    assert r.exit_code == 1 and "needs a GPU" in r.output and "Traceback" not in r.output, r.output
    monkeypatch.setattr(_env, "onednn_uses_amx", lambda: False)  # BatchNorm is allowed where AMX runs
    for has_bf16, words in ((False, "needs a CPU with AVX512-BF16"), (True, "slower with BatchNorm")):
        monkeypatch.setattr(_env, "onednn_has_bf16", lambda has=has_bf16: has)
        r = CliRunner().invoke(cli.main, ["train", *TINY, "--ctx", "cpu", "--output-dir", str(tmp_path), "--amp"])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert not list(tmp_path.iterdir())  # nothing was started


def test_a_float32_run_on_an_amx_cpu_is_told_about_amp(tmp_path, cli_env, monkeypatch):
    """Where oneDNN could run AMX, a new float32 run's log says --amp is there (one note line);
    elsewhere nothing is said."""
    for amx in (True, False):
        monkeypatch.setattr(_env, "onednn_uses_amx", lambda amx=amx: amx)
        out = tmp_path / str(amx)
        r = CliRunner().invoke(cli.main, ["train", *TINY, "--ctx", "cpu", "--output-dir", str(out), "--name", "r"])
        assert r.exit_code == 0, r.output
        notes = [ln for ln in (out / "r" / "train.log").read_text().splitlines() if "AMX" in ln]
        assert len(notes) == (1 if amx else 0) and all("--amp" in ln for ln in notes), notes


def test_the_amx_note_names_the_cifar10_bfloat16_recipe_for_cifar10_only(monkeypatch):
    import mxnet as mx

    from vgg_gluon.cli.train import _amx_note
    monkeypatch.setattr(_env, "onednn_uses_amx", lambda: True)
    note = _amx_note(RunConfig(dataset="cifar10"), [mx.cpu()])
    epochs = RunConfig.from_yaml(Path(__file__).parents[1] / "experiments" / "cifar10_amx.yaml").epochs
    assert "cifar10_amx.yaml" in note and f"{epochs} epochs" in note   # the recipe's count, as it stands
    assert "cifar10_amx.yaml" not in _amx_note(RunConfig(dataset="fashion-mnist"), [mx.cpu()])
    assert _amx_note(RunConfig(dataset="cifar10", amp=True), [mx.cpu()]) is None
    assert _amx_note(RunConfig(dataset="cifar10"), [mx.gpu(0)]) is None
    monkeypatch.setattr(_env, "onednn_uses_amx", lambda: False)
    assert _amx_note(RunConfig(dataset="cifar10"), [mx.cpu()]) is None


def test_amp_run_with_batch_norm_started_on_amx_resumes_on_a_cpu_without_it(monkeypatch):
    """The BatchNorm refusal is about speed: a new run without AMX gets it, an existing run (started
    on an AMX machine) is not stranded when it resumes on one with AVX512-BF16 alone."""
    import mxnet as mx

    from vgg_gluon import session
    from vgg_gluon.config import ConfigError
    monkeypatch.setattr(_env, "onednn_has_bf16", lambda: True)
    monkeypatch.setattr(_env, "onednn_uses_amx", lambda: False)
    cfg = RunConfig(amp=True, batch_norm=True)
    with pytest.raises(ConfigError, match="slower with BatchNorm"):
        session._check_devices(cfg, [mx.cpu()], train=True)
    session._check_devices(cfg, [mx.cpu()], train=True, resuming=True)
    monkeypatch.setattr(_env, "onednn_uses_amx", lambda: True)
    session._check_devices(cfg, [mx.cpu()], train=True)


@pytest.mark.skipif(not _env.onednn_has_bf16(), reason="this CPU has no AVX512-BF16 (bfloat16 AMP is refused here)")
@pytest.mark.parametrize("batch_norm", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _env.onednn_uses_amx(), reason="bfloat16 AMP with BatchNorm needs AMX (refused without it)"))])
def test_bfloat16_amp_on_a_cpu_trains_and_resumes_exactly(tmp_path, cli_env, batch_norm):
    """`--amp` on a CPU with AVX512-BF16 (a network without BatchNorm) or AMX (with it too): the
    convolutions run in bfloat16 (the losses differ from float32's, a little), no loss scaling,
    and a run killed after its first checkpoint and resumed ends with the weights of the
    uninterrupted one. In subprocesses: amp.init patches MXNet's operators for the rest of a
    process."""
    import mxnet as mx
    import numpy as np

    from vgg_gluon import checkpoint as ck
    from vgg_gluon import report

    args = [*tiny_args(train_limit=128, epochs=2), *([] if batch_norm else ["--no-batch-norm"]), "--lr", "0.02",
            "--ctx", "cpu", "--output-dir", str(tmp_path)]

    def cli_run(*more, crash=None):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if crash:
            env["VGG_GLUON_CRASH_AT"] = crash
        return subprocess.run([sys.executable, "-m", "vgg_gluon", *more], env=env, capture_output=True,
                              text=True, timeout=300)

    for name, more in (("fp32", []), ("bf16", ["--amp"])):
        r = cli_run("train", *args, "--name", name, *more)
        assert r.returncode == 0, r.stderr[-2000:]
    header = (tmp_path / "bf16" / "train.log").read_text().splitlines()[0]
    assert "ctx cpu:0 (1 thread), AMP bfloat16," in header, header
    r = cli_run("train", *args, "--name", "part", "--amp", crash="after-pointer@1")
    assert r.returncode != 0  # killed once epoch 1 was committed
    r = cli_run("resume", str(tmp_path / "part"))
    assert r.returncode == 0, r.stderr[-2000:]

    def history(name):
        return report.read_history(tmp_path / name / "history.csv")

    def weights(name):
        c = ck.select_checkpoint(tmp_path / name, "last")
        return {k: v.asnumpy() for k, v in mx.nd.load(str(c.file(ck.PARAMS))).items()}

    fp32, bf16, part = history("fp32"), history("bf16"), history("part")
    assert [h["epoch"] for h in part] == [1, 2]
    assert bf16[0]["train_loss"] != fp32[0]["train_loss"]                      # bfloat16 did compute
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], rel=0.05)  # and close to float32
    for a, b in zip(bf16, part):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    wb, wp = weights("bf16"), weights("part")
    assert all(v.dtype == np.float32 for v in wb.values())  # float32 weights in the checkpoint
    for k in wb:
        np.testing.assert_allclose(wb[k], wp[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_amp_with_float16_dtype_is_refused(tmp_path, cli_env):
    from vgg_gluon.config import ConfigError
    with pytest.raises(ConfigError, match="amp keeps float32 weights"):
        RunConfig(amp=True, dtype="float16").validate()
    r = CliRunner().invoke(cli.main, ["train", *TINY, "--amp", "--dtype", "float16", "--output-dir", str(tmp_path)])
    assert r.exit_code == 2 and "'--amp'" in r.output and "Traceback" not in r.output, r.output


def test_amp_loss_scaling_trains_as_float32_and_skips_overflowing_steps():
    """AMP's trainer hooks and scaled loss inside train_one_epoch, with every operator left in
    float32 (a CPU has no float16 gemm): the loss is multiplied by the loss scale (2^16) before
    backward and the gradients divided by it in the step, exact powers of two in float32, so the
    weights equal those of the same steps without AMP. A step whose scaled gradients overflow is
    skipped (weights unchanged) and the scale halved; the next step is a normal one. In a subprocess,
    because amp.init patches MXNet's operator namespaces for the rest of the process."""
    code = textwrap.dedent("""
        import mxnet as mx, numpy as np
        from vgg_gluon import engine, models
        from vgg_gluon.config import RunConfig
        rng = np.random.default_rng(0)
        x = mx.nd.array(rng.normal(size=(16, 1, 32, 32))); y = mx.nd.arange(16) % 10
        class L:
            ctx_list = [mx.cpu()]
            def __len__(self): return 4
            def epoch(self, e, start_batch=0):
                for _ in range(start_batch, 4): yield [x], [y]
        def run(amp):
            cfg = RunConfig(amp=amp, epochs=2, lr=0.05, warmup_epochs=0, lr_schedule="constant")
            net = models.build_vgg("vgg11", 10, width=0.0625, batch_norm=True, fc_units=16, dropout=0.0)
            models.initialize(net, [mx.cpu()], input_shape=(1, 32, 32), seed=1)
            net.hybridize(static_alloc=True, static_shape=True)
            tr = engine.make_trainer(net, cfg, iters_per_epoch=4)
            m = engine.train_one_epoch(net, tr, L(), mx.gluon.loss.SoftmaxCrossEntropyLoss(), epoch=1,
                                       num_classes=10, seed=3)
            return tr, m, {k: p.data().asnumpy() for k, p in zip(range(99), net.collect_params().values())}
        plain_tr, plain_m, plain = run(False)
        assert getattr(plain_tr, "_amp_loss_scaler", None) is None
        engine.init_amp(target_precision_ops=[])
        tr, m, amp_w = run(True)
        scaler = tr._amp_loss_scaler
        assert scaler.loss_scale == 2.0 ** 16, scaler.loss_scale
        assert abs(m["train_loss"] - plain_m["train_loss"]) < 1e-5 * plain_m["train_loss"], (m, plain_m)
        for k in plain:
            np.testing.assert_allclose(amp_w[k], plain[k], rtol=1e-5, atol=1e-7, err_msg=str(k))

        # An overflowing step: gradients x 2^16 beyond float32's range.
        from mxnet.contrib import amp
        class W(mx.gluon.Block):
            def __init__(self):
                super().__init__()
                self.w = self.params.get("w", shape=(4,), init=mx.init.One())
            def forward(self, v):
                return (self.w.data() * v).sum()
        net = W(); net.initialize()
        tr = engine.make_trainer(net, RunConfig(amp=True, epochs=2, lr=0.1, lr_schedule="constant",
                                                warmup_epochs=0), iters_per_epoch=4)
        for big, changes in ((1e35, False), (1.0, True)):
            before = net.w.data().asnumpy().copy()
            with mx.autograd.record():
                loss = net(mx.nd.full((4,), big))
                with amp.scale_loss(loss, tr) as scaled:
                    mx.autograd.backward(scaled)
            tr.step(1)
            after = net.w.data().asnumpy()
            assert np.isfinite(after).all()
            assert (not np.array_equal(before, after)) == changes, (big, before, after)
        np.testing.assert_allclose(after, 1 - 0.1 * (1 + 5e-4), rtol=1e-6)   # the normal step: lr (g + wd w)
        assert tr._amp_loss_scaler.loss_scale == 2.0 ** 15   # halved after the overflow (MXNet: at the next step)
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
