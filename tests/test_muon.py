"""`--optimizer muon`: the Newton-Schulz orthogonalization, the update rule against a numpy
reference, NAG for the other parameters, exact resume with lookahead and whitening, two devices,
and the refusals (tiny nets: seconds each)."""
import mxnet as mx
import numpy as np
import pytest
from test_fasttrain import FAST, _assert_same_final, _final, _invoke, _stop_inside_epoch_2_and_resume

from vgg_gluon import muon
from vgg_gluon.config import ConfigError, RunConfig


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (8, 8)])
def test_newton_schulz_keeps_the_singular_vectors_and_evens_out_the_singular_values(shape):
    rng = np.random.RandomState(0)
    k = min(shape)
    u0, _ = np.linalg.qr(rng.randn(shape[0], k))
    v0, _ = np.linalg.qr(rng.randn(shape[1], k))
    g = (u0 * np.logspace(1, 0, k) @ v0.T).astype(np.float32)  # singular values 10 ... 1
    x = muon.newton_schulz(mx.nd.array(g)).asnumpy()
    assert x.shape == g.shape
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    core = u.T @ x @ vt.T                 # diagonal if x has g's singular vectors
    off = core - np.diag(np.diag(core))
    assert np.abs(off).max() < 1e-4
    d = np.diag(core)
    assert s.max() / s.min() > 9          # g is far from orthogonal
    assert d.min() > 0.3 and d.max() < 1.3, d  # x is close to it (3 quintic steps: about 0.5-1.2)


def _numpy_newton_schulz(g, steps=3):
    a, b, c = muon.NS_COEFFICIENTS
    x = g / (np.linalg.norm(g) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_filters_take_muon_steps_and_other_parameters_nag_steps():
    rng = np.random.RandomState(1)
    opt = muon.Muon(learning_rate=0.5, momentum=0.85, muon_momentum=0.6, muon_scale=0.4, wd=0.01,
                    rescale_grad=0.5)
    nag = mx.optimizer.NAG(learning_rate=0.5, momentum=0.85, wd=0.01, rescale_grad=0.5)
    w0 = rng.randn(6, 3, 3, 3).astype(np.float32)
    b0 = rng.randn(6).astype(np.float32)
    w, b, b_ref = mx.nd.array(w0), mx.nd.array(b0), mx.nd.array(b0)
    sw, sb, sb_ref = opt.create_state(0, w), opt.create_state(1, b), nag.create_state(1, b_ref)
    ref_w, buf = w0.copy(), np.zeros_like(w0)
    for _ in range(3):
        gw, gb = rng.randn(*w0.shape).astype(np.float32), rng.randn(6).astype(np.float32)
        opt.update(0, w, mx.nd.array(gw), sw)
        opt.update(1, b, mx.nd.array(gb), sb)
        nag.update(1, b_ref, mx.nd.array(gb), sb_ref)
        g = gw * 0.5
        buf = 0.6 * buf + g
        step = _numpy_newton_schulz((g + 0.6 * buf).reshape(6, -1)).reshape(w0.shape)
        ref_w = ref_w * (np.sqrt(6) / np.linalg.norm(ref_w)) - 0.5 * 0.4 * step  # no weight decay on filters
        np.testing.assert_allclose(w.asnumpy(), ref_w, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(b.asnumpy(), b_ref.asnumpy())  # MXNet's NAG, bit for bit


def test_the_filters_lr_follows_the_schedule_as_muon_lr_over_lr():
    from vgg_gluon.optim import optimizer_params
    cfg = RunConfig(optimizer="muon", lr=1.5, lr_base_batch=1024, batch_size=512, muon_lr=0.24,
                    muon_momentum=0.5, momentum=0.85).validate()
    p = optimizer_params(cfg, iters_per_epoch=10)
    assert p["muon_scale"] == pytest.approx(0.24 / 0.75) and p["muon_momentum"] == 0.5 and p["momentum"] == 0.85


# Also the regression test of the lookahead's wait for the step (fasttrain.Lookahead.after_step):
# without it, on 2 threads, the BatchNorm running means of two identical runs of this recipe
# ended 2.5e-4 apart, every time it was tried.
MUON = [*FAST, "--optimizer", "muon", "--muon-lr", "0.05", "--momentum", "0.85", "--lr", "0.05",
        "--image-size", "32", "--stem-bias-epochs", "1"]


def test_muon_with_lookahead_and_whitening_interrupted_and_resumed_equals_uninterrupted(tmp_path, cli_env,
                                                                                       monkeypatch):
    """Stopped inside epoch 2, resumed: the same weights, filter momentum and lookahead state."""
    r = _invoke("train", *MUON, "--epochs", 3, "--output-dir", tmp_path, "--name", "full")
    assert r.exit_code == 0, r.output
    _stop_inside_epoch_2_and_resume(MUON, tmp_path / "part", monkeypatch)
    full, _ = _assert_same_final(tmp_path / "full", tmp_path / "part")
    # Every filter bank that trained has the norm Muon keeps (sqrt of its output channels), to the
    # last step's change; the frozen whitening stem kept its own.
    convs = [k for k, v in full.items() if v.ndim == 4 and not k.endswith("stem.conv.weight")]
    assert convs
    for k in convs:
        assert np.linalg.norm(full[k]) == pytest.approx(np.sqrt(full[k].shape[0]), rel=0.2), k


def test_muon_on_two_devices_trains(tmp_path, cli_env):
    r = _invoke("train", *MUON, "--epochs", 1, "--ctx", "cpu:0,1", "--output-dir", tmp_path, "--name", "two")
    assert r.exit_code == 0, r.output
    params, _ = _final(tmp_path / "two")
    assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize("values, words", [
    (dict(optimizer="muon", kvstore="dist_async"), "dist_async"),
    (dict(optimizer="muon", dtype="float16"), "float32"),
    (dict(optimizer="muon", muon_momentum=1.0), "muon_momentum"),
    (dict(optimizer="muon", muon_lr=0.0), "muon_lr"),
])
def test_refusals(values, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig(**values).validate()


@pytest.mark.slow
def test_dist_sync_workers_with_muon_stay_identical(tmp_path, tiny_data_dir):
    """Two dist_sync workers: muon runs on each worker on the summed gradients, so both hold the
    same weights after every step (the servers only sum)."""
    from conftest import run_cli
    from test_fasttrain import _arrays
    env = {"VGG_GLUON_DATA_DIR": str(tiny_data_dir), "VGG_GLUON_DIST_DUMP": str(tmp_path / "dump")}
    run_cli("launch", "-n", "2", "--grace", "3", "--", "train", *MUON, "--epochs", 2, "--output-dir", tmp_path,
            "--name", "d", env_extra=env, timeout=600)
    w0, w1 = (_arrays(tmp_path / "dump" / f"worker-{i}.params") for i in (0, 1))
    assert w0
    for k in w0:
        assert np.array_equal(w0[k], w1[k]), k
