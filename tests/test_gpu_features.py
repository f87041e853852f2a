"""GPU-oriented options (--amp, --dtype float16) exercised as far as a CPU allows."""
import subprocess
import sys
import textwrap

from click.testing import CliRunner
from conftest import tiny_args

from vgg_gluon import cli
from vgg_gluon.config import RunConfig

TINY = tiny_args(train_limit=128, epochs=1)


def test_float16_and_amp_on_cpu_are_one_line_errors(tmp_path, cli_env):
    for flag in (["--dtype", "float16"], ["--amp"]):
        r = CliRunner().invoke(cli.main, ["train", *TINY, "--ctx", "cpu", "--output-dir", str(tmp_path), *flag])
        assert r.exit_code == 1, r.output
        assert "needs a GPU" in r.output and "Traceback" not in r.output


def test_amp_with_float16_dtype_is_refused(tmp_path, cli_env):
    import pytest

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
