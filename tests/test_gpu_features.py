"""GPU-oriented options (--amp, --dtype float16) exercised as far as a CPU allows."""
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from vgg_gluon import cli, engine
from vgg_gluon.config import RunConfig

TINY = ["--width", "0.0625", "--fc-units", "32", "--batch-size", "64", "--train-limit", "128",
        "--test-limit", "64", "--epochs", "1", "--quiet"]


def test_float16_and_amp_on_cpu_are_one_line_errors(tmp_path, cli_env):
    for flag in (["--dtype", "float16"], ["--amp"]):
        r = CliRunner().invoke(cli.main, ["train", *TINY, "--ctx", "cpu", "--output-dir", str(tmp_path), *flag])
        assert r.exit_code == 1, r.output
        assert "needs a GPU" in r.output and "Traceback" not in r.output


def test_amp_with_float16_dtype_is_refused():
    import pytest

    from vgg_gluon.config import ConfigError
    with pytest.raises(ConfigError, match="amp keeps float32 weights"):
        RunConfig(amp=True, dtype="float16").validate()


def test_float16_trainer_keeps_float32_master_weights():
    import mxnet as mx

    from vgg_gluon import models
    net = models.build_vgg("vgg11", 10, width=0.0625, batch_norm=True, fc_units=16)
    models.initialize(net, [mx.cpu()], input_shape=(1, 32, 32))
    net.cast("float16")
    assert engine.input_dtype(net) == "float16"
    tr = engine.make_trainer(net, RunConfig(dtype="float16", epochs=2), iters_per_epoch=4)
    assert tr._optimizer.multi_precision


def test_amp_loss_scaling_path_trains_on_cpu():
    """AMP's trainer hooks and scaled loss inside train_one_epoch, with every operator left in
    float32 (a CPU has no float16 gemm); runs in a subprocess because amp.init patches MXNet's
    operator namespaces for the rest of the process."""
    code = textwrap.dedent("""
        import mxnet as mx, numpy as np
        from vgg_gluon import engine, models
        from vgg_gluon.config import RunConfig
        engine.init_amp(target_precision_ops=[])
        net = models.build_vgg("vgg11", 10, width=0.0625, batch_norm=True, fc_units=16)
        models.initialize(net, [mx.cpu()], input_shape=(1, 32, 32), seed=1)
        net.hybridize(static_alloc=True, static_shape=True)
        tr = engine.make_trainer(net, RunConfig(amp=True, epochs=2, lr=0.05), iters_per_epoch=4)
        assert tr._amp_loss_scaler is not None
        x = mx.nd.random.normal(shape=(16, 1, 32, 32)); y = mx.nd.arange(16) % 10
        class L:
            ctx_list = [mx.cpu()]
            def __len__(self): return 4
            def epoch(self, e, start_batch=0):
                for _ in range(start_batch, 4): yield [x], [y]
        before = net.features[0][0].weight.data().asnumpy().copy()
        m = engine.train_one_epoch(net, tr, L(), mx.gluon.loss.SoftmaxCrossEntropyLoss(), epoch=1,
                                   num_classes=10, seed=3)
        assert np.isfinite(m["train_loss"]), m
        assert not np.allclose(before, net.features[0][0].weight.data().asnumpy())
        print("OK", tr._amp_loss_scaler.loss_scale)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
