"""Training behaviour: exact resume, several devices, NaN handling (tiny nets, tiny data)."""
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import engine_run, tiny_args

from vgg_gluon import checkpoint as ck
from vgg_gluon import cli, engine, report
from vgg_gluon.config import RunConfig

TINY = tiny_args(log_interval=1)


def _params(run_dir: Path, which="last"):
    c = ck.select_checkpoint(run_dir, which)
    return {k: v.asnumpy() for k, v in mx.nd.load(str(c.file(ck.PARAMS))).items()}


def _invoke(*args):
    r = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    return r


@pytest.mark.parametrize("stop_at_step", [4, 6])  # 4 steps/epoch: 4 = end of epoch 1, 6 = inside epoch 2
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, cli_env, monkeypatch, stop_at_step):
    """A run stopped as Ctrl-C stops it (the engine's stop check) and continued by `vgg-gluon resume`
    replays the uninterrupted run step for step: the same steps, rates and losses, history and
    weights. The resumed steps are watched through the progress display (nothing else changed)."""
    seen = []
    settings = dict(epochs=3, warmup_epochs=1, log_interval=1)
    engine_run(tmp_path / "full", on_progress=lambda p: seen.append((p.epoch, p.step, p.loss, p.lr)), **settings)
    full = list(seen)
    assert len(full) == 12

    seen.clear()
    result = engine_run(tmp_path / "part", stop_after=stop_at_step,
                        on_progress=lambda p: seen.append((p.epoch, p.step, p.loss, p.lr)), **settings)
    assert result.status == "stopped" and result.checkpoint is not None
    monkeypatch.setattr(cli.Console, "progress", lambda self, p: seen.append((p.epoch, p.step, p.loss, p.lr)))
    r = _invoke("resume", tmp_path / "part")
    assert r.exit_code == 0, r.output
    part = list(seen)

    assert [(e, s) for e, s, _, _ in part] == [(e, s) for e, s, _, _ in full]
    np.testing.assert_allclose([lr for *_, lr in part], [lr for *_, lr in full], rtol=1e-6)
    np.testing.assert_allclose([lo for _, _, lo, _ in part], [lo for _, _, lo, _ in full], rtol=1e-4)
    hf = report.read_history(tmp_path / "full" / "history.csv")
    hp = report.read_history(tmp_path / "part" / "history.csv")
    assert [h["epoch"] for h in hp] == [1, 2, 3]
    for a, b in zip(hf, hp):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    pf, pp = _params(tmp_path / "full"), _params(tmp_path / "part")
    for k in pf:
        np.testing.assert_allclose(pf[k], pp[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_resume_with_more_epochs_rebuilds_the_schedule(tmp_path, cli_env):
    """`resume --epochs 4` of a 2-epoch run: epochs 3-4 follow the 4-epoch schedule at the update
    count reached (4 steps per epoch, warmup 1 epoch, cosine from lr 0.05); fewer epochs than
    done trains nothing and changes nothing."""
    run = tmp_path / "r"
    r = _invoke("train", *TINY, "--epochs", 2, "--lr", 0.05, "--lr-schedule", "cosine", "--warmup-epochs", 1,
                "--output-dir", tmp_path, "--name", "r")
    assert r.exit_code == 0, r.output
    assert [h["lr"] for h in report.read_history(run / "history.csv")] == pytest.approx([0.05, 0.0], abs=1e-12)
    r = _invoke("resume", run)
    assert r.exit_code == 0 and "already trained 2 of 2" in r.output
    r = _invoke("resume", run, "--epochs", 4)
    assert r.exit_code == 0, r.output
    hist = report.read_history(run / "history.csv")
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    # epoch 3 ends at update 12: 0.05 * (1 + cos(pi * 8 / 11)) / 2 (cosine over updates 4..15)
    assert [h["lr"] for h in hist] == pytest.approx([0.05, 0.0, 0.008628481651367875, 0.0], rel=1e-6, abs=1e-12)
    meta = ck.select_checkpoint(run).meta()
    assert meta["epoch"] == 4 and meta["num_update"] == 16 and meta["config"]["epochs"] == 4
    before = _tree(run)
    r = _invoke("resume", run, "--epochs", 3)
    assert r.exit_code == 0 and "already trained 4 of 3" in r.output, r.output
    assert _tree(run) == before


def test_resume_with_fewer_epochs_than_a_stopped_run_changes_nothing(tmp_path, cli_env):
    """Stopped inside epoch 2 of 3, then `resume --epochs 1`: nothing to train; the stopped epoch's
    checkpoint and the run's settings stay (it used to 'finish' the run: config.yaml said 1 epoch
    while the newest checkpoint was the stopped one)."""
    run = tmp_path / "r"
    assert engine_run(run, stop_after=6, epochs=3, log_interval=1).status == "stopped"
    step = ck.select_checkpoint(run).step
    before = _tree(run)
    r = _invoke("resume", run, "--epochs", 1)
    assert r.exit_code == 0 and f"already trained 1 of 1 epochs (epoch 2 was stopped at step {step})" in r.output
    assert _tree(run) == before
    r = _invoke("resume", run)          # the stopped epoch is still there to finish
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in report.read_history(run / "history.csv")] == [1, 2, 3]


def test_two_cpu_contexts_match_one(tmp_path, cli_env):
    """Data parallel on cpu(0), cpu(1) makes the same updates as one device (no BN, no dropout:
    BatchNorm statistics are per device and dropout masks per device stream). Compared on what
    training changed (final minus initial weights; 0.15% to 100% of a tensor's size after 8 steps
    at lr 0.05): the weights themselves are mostly the shared initialisation."""
    args = [*TINY, "--epochs", 2, "--no-batch-norm", "--dropout", 0, "--lr", 0.05, "--lr-schedule", "constant",
            "--warmup-epochs", 0, "--output-dir", tmp_path]
    assert _invoke("train", *args, "--ctx", "cpu:0", "--name", "one").exit_code == 0
    r = _invoke("train", *args, "--ctx", "cpu:0,1", "--name", "two")
    assert r.exit_code == 0, r.output
    assert "ctx cpu:0,1" in (tmp_path / "two" / "train.log").read_text()
    cfg = RunConfig.from_dict(ck.select_checkpoint(tmp_path / "one").meta()["config"])
    net = engine.build_session(cfg).net        # the seeded initialisation both runs started from
    start = {k: p.data().asnumpy() for k, p in zip(_params(tmp_path / "one"), net.collect_params().values())}
    p1, p2 = _params(tmp_path / "one"), _params(tmp_path / "two")
    for k in p1:
        d1, d2 = p1[k] - start[k], p2[k] - start[k]
        assert np.linalg.norm(d1) > 1e-3 * np.linalg.norm(start[k]), k    # far above float32 rounding
        # measured: at most 3e-6 apart
        assert np.linalg.norm(d2 - d1) < 1e-4 * np.linalg.norm(d1), (k, np.linalg.norm(d2 - d1) / np.linalg.norm(d1))


def test_two_contexts_with_batch_norm_train(tmp_path, cli_env):
    r = _invoke("train", *TINY, "--epochs", 1, "--ctx", "cpu:0,1", "--output-dir", tmp_path, "--name", "bn2")
    assert r.exit_code == 0, r.output
    ck.verify(ck.select_checkpoint(tmp_path / "bn2"))


def test_batch_smaller_than_devices_is_refused(tmp_path, cli_env):
    r = _invoke("train", "--width", "0.0625", "--train-limit", 64, "--batch-size", 1, "--ctx", "cpu:0,1",
                "--output-dir", tmp_path)
    assert r.exit_code == 2 and "'--batch-size': must be at least the number of devices (2)" in r.output


def test_nan_stops_with_distinct_code_and_keeps_last_good(tmp_path, cli_env):
    assert _invoke("train", *TINY, "--epochs", 1, "--output-dir", tmp_path, "--name", "n").exit_code == 0
    before = (tmp_path / "n" / "epoch-0001" / ck.MANIFEST).read_bytes()
    # Same run continued with an absurd learning rate cannot be expressed by resume (lr is fixed),
    # so a fresh run without BN blows up instead; the earlier run's files stay untouched.
    r = _invoke("train", *TINY, "--epochs", 2, "--no-batch-norm", "--lr", 1e8, "--warmup-epochs", 0,
                "--output-dir", tmp_path, "--name", "boom")
    assert r.exit_code == cli.EXIT_NONFINITE, r.output
    assert "epoch 1, step" in r.output and "lower --lr" in r.output
    assert not ck.list_checkpoints(tmp_path / "boom")
    assert (tmp_path / "n" / "epoch-0001" / ck.MANIFEST).read_bytes() == before


def test_lr_schedules_per_iteration():
    cfg = RunConfig(epochs=4, lr=0.1, warmup_epochs=1, lr_schedule="step", lr_steps=[2, 3], lr_factor=0.1)
    s = engine.make_lr_scheduler(cfg, iters_per_epoch=10)
    assert s(0) == pytest.approx(0.0, abs=1e-9)
    assert s(5) == pytest.approx(0.1 * 5 / 9)  # gluoncv warms up linearly over iterations 0..N-1
    assert s(15) == pytest.approx(0.1)
    assert s(25) == pytest.approx(0.01)
    assert s(35) == pytest.approx(0.001)
    cos = engine.make_lr_scheduler(RunConfig(epochs=2, lr=0.1), iters_per_epoch=10)
    seq = [cos(i) for i in range(21)]
    assert seq[0] == pytest.approx(0.1) and seq[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(seq, seq[1:])) and 0.04 < seq[10] < 0.06
    const = engine.make_lr_scheduler(RunConfig(epochs=2, lr=0.1, lr_schedule="constant"), iters_per_epoch=10)
    assert const(0) == const(19) == pytest.approx(0.1)


# The learning rate of the shipped recipes at chosen update counts (the optimizer's num_update:
# 1 is the first step), on the full data sets (60,000 / 50,000 training images, batch 128: 468 /
# 390 steps per epoch). Written out from the formulas, not from the code: warmup 0 -> lr linearly
# over the warmup's W updates (lr * u / (W - 1)), then lr * (1 + cos(pi * T / (N - 1))) / 2 with
# T = u - W over the N updates left, 0 from the last one on.
RECIPE_LR = {
    "fashion_mnist_vgg11.yaml": (468, {1: 0.0004291845493562232, 117: 0.050214592274678116, 234: 0.1,
                                 235: 0.09999997996114104, 1000: 0.08869574338341853,
                                 1872: 0.05520564691342547, 3000: 0.010660477601830238, 3744: 0.0}),
    "fashion_mnist_fast.yaml": (468, {1: 0.0007173601147776184, 140: 0.1, 141: 0.0999999442800646,
                                      700: 0.05887292940821706, 1404: 0.0}),
    "cifar10_vgg11.yaml": (390, {1: 0.0002570694087403599, 195: 0.050128534704370176, 390: 0.1,
                           391: 0.09999999172031998, 2000: 0.08003032969238222, 5850: 0.0}),
    "d2l_vgg11_224.yaml": (468, {1: 0.05, 1000: 0.05, 2340: 0.05}),
    "fashion_mnist_tta.yaml": (468, {1: 0.0004291845493562232, 117: 0.050214592274678116, 234: 0.1,
                                     235: 0.09999997996114104, 1000: 0.08869574338341853, 3744: 0.0}),
    # batch 512: 97 steps; peak 1.5 x 512 / 1024 (lr_base_batch) = 0.75 after W = 3.2 x 97 = 310.4
    # updates (0.75 u / 309.4), then linear to 0 over N = 10.8 x 97 = 1047.6: 0.75 (1 - T / (N - 1))
    "cifar10_fast3.yaml": (97, {1: 0.0024240465416936, 100: 0.24240465416936002, 310: 0.75,
                                311: 0.7495700363080451, 600: 0.5424708580164342, 1358: 0.0}),
    # the default: from 0.2 x 0.75 = 0.15 up over W = 3.2 x 97 = 310.4 updates (0.15 + 0.6 u / 309.4),
    # then down to 0.07 x 0.75 = 0.0525 at 14 x 97 = 1358
    "cifar10.yaml": (97, {1: 0.1519392372333549, 100: 0.34392372333548804, 310: 0.75, 311: 0.7496001337664819,
                          312: 0.7489336900439518, 600: 0.5569978979552839, 1358: 0.052500000000000005}),
    # the default at 28 epochs (bfloat16 on AMX): the same warm-up, then down to 0.0525 at 28 x 97 = 2716,
    # 0.75 - 0.6975 (u - 310.4) / (24.8 x 97 - 1)
    "cifar10_amx.yaml": (97, {1: 0.1519392372333549, 100: 0.34392372333548804, 310: 0.75, 311: 0.7498259585793895,
                              1000: 0.5499683939116693, 2000: 0.25989935956084176, 2715: 0.05249999999999999,
                              2716: 0.0525}),
    # airbench95's scale (fast3w, bfloat16 on AMX): peak 1.304 x 512 / 1024 = 0.652 after W = 3.45 x 97 =
    # 334.65 updates from 0.2 of it (0.1304 + 0.5216 u / 333.65), then down to 0.07 of it (0.04564) over
    # N = 11.55 x 97 = 1120.35: 0.652 - 0.60636 (u - W) / (N - 1), 0.04564 from 15 x 97 = 1455 on
    "cifar10_fast3w_amx.yaml": (97, {1: 0.13196331485089166, 100: 0.2867314850891653, 334: 0.652,
                                     335: 0.6518104024657168, 1000: 0.29157508732746695, 1454: 0.04564,
                                     1455: 0.04564}),
    # the same at 27 epochs (what 45 minutes hold): W = 6.21 x 97 = 602.37 (0.1304 + 0.5216 u / 601.37), then
    # down over N = 20.79 x 97 = 2016.63: 0.652 - 0.60636 (u - W) / (N - 1), 0.04564 from 27 x 97 - 1 = 2618 on
    "cifar10_fast3w_amx_long.yaml": (97, {1: 0.13126735287759614, 100: 0.21713528775961555, 602: 0.652,
                                          603: 0.6518104777166445, 1500: 0.3819668457008479, 2618: 0.04564,
                                          2619: 0.04564}),
    # 117 steps of 512; W = 3.7 x 117 = 432.9 (0.75 u / 431.9), then linear to 0 at 16 x 117 = 1872
    "fashion_mnist_fast3.yaml": (117, {1: 0.0017365130817318386, 100: 0.1736513081731882, 432: 0.75,
                                       433: 0.7499478478548085, 800: 0.5585494750017383, 1872: 0.0}),
    # the same at 24 epochs in bfloat16 (AMX): W = 5.55 x 117 = 649.35 (0.75 u / 648.35), then linear to 0
    # over N = 18.45 x 117 = 2158.65: 0.75 (1 - T / (N - 1)), 0 from 24 x 117 - 1 = 2807 on
    "fashion_mnist_amx.yaml": (117, {1: 0.001156782601989666, 100: 0.1156782601989666, 649: 0.75,
                                     650: 0.7497740597409218, 1500: 0.4543137209464, 2808: 0.0}),
    # the default: 117 steps of 512; W = 1.4 x 117 = 163.8 (0.75 u / 162.8), N = 4.6 x 117 = 538.2,
    # T = u - W
    "fashion_mnist.yaml": (117, {1: 0.004606879606879608, 100: 0.46068796068796075, 163: 0.75,
                                 164: 0.7497207743857036, 300: 0.5598473566641846, 701: 0.0}),
}


def test_every_shipped_recipe_has_pinned_rates():
    shipped = sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.yaml"))
    assert shipped == sorted(RECIPE_LR), "pin the learning rate of the new recipe in RECIPE_LR"


@pytest.mark.parametrize("recipe", sorted(RECIPE_LR))
def test_recipe_schedules_are_pinned(recipe):
    cfg = cli.resolve_config(str(Path(__file__).parents[1] / "experiments" / recipe), {})
    iters, pinned = RECIPE_LR[recipe]
    assert {"fashion-mnist": 60000, "cifar10": 50000}[cfg.dataset] // cfg.batch_size == iters
    s = engine.make_lr_scheduler(cfg, iters_per_epoch=iters)
    for update, lr in pinned.items():
        assert s(update) == pytest.approx(lr, rel=1e-9, abs=1e-12), (recipe, update)


def test_extended_schedule_is_pinned():
    """`resume --epochs 12` of the classic Fashion-MNIST recipe: the schedule for 12 epochs at the
    same update count."""
    recipe = Path(__file__).parents[1] / "experiments" / "fashion_mnist_vgg11.yaml"
    cfg = cli.resolve_config(str(recipe), {"epochs": 12})
    s = engine.make_lr_scheduler(cfg, iters_per_epoch=468)
    for update, lr in {3744: 0.026979846262024598, 3745: 0.02695393657267735, 4500: 0.010225215462052434,
                       5616: 0.0}.items():
        assert s(update) == pytest.approx(lr, rel=1e-9, abs=1e-12), update


def test_step_schedule_with_fractional_warmup_is_pinned():
    cfg = RunConfig(epochs=6, lr=0.2, warmup_epochs=0.5, lr_schedule="step", lr_steps=[3, 5], lr_factor=0.5)
    s = engine.make_lr_scheduler(cfg, iters_per_epoch=10)
    for update, lr in {1: 0.2 / 4, 4: 0.2, 5: 0.2, 29: 0.2, 30: 0.1, 49: 0.1, 50: 0.05, 60: 0.05}.items():
        assert s(update) == pytest.approx(lr, rel=1e-9), update


def _session(tiny_data_dir, **settings):
    base = dict(data_dir=str(tiny_data_dir), width=0.0625, fc_units=32, batch_size=64, train_limit=64,
                test_limit=64, epochs=1, lr=0.05, warmup_epochs=0.0, ctx="cpu")
    return engine.build_session(RunConfig(**{**base, **settings}))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_label_smoothing_loss_is_the_smoothed_cross_entropy(tmp_path, tiny_data_dir, eps):
    """The first step's loss, as fit reports it, is -sum(q log softmax(z)) with q = (1 - eps) one-hot
    + eps / K, from the network's own logits (made large, so that smoothing changes the loss)."""
    s = _session(tiny_data_dir, label_smoothing=eps, dropout=0.0, lr_schedule="constant")
    fc = [p for name, p in s.net.collect_params().items() if name.endswith("weight")][-1]   # the output layer
    fc.set_data(fc.data() * 40)
    data, labels = next(s.train_loader.epoch(1))
    with mx.autograd.train_mode():           # BatchNorm on the batch's statistics, as in training
        z = s.net(data[0]).asnumpy().astype(np.float64)
    y = labels[0].asnumpy().astype(int)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    q = np.full(z.shape, eps / 10) + (1 - eps) * np.eye(10)[y]
    expected = float(-(q * logp).sum(1).mean())
    assert abs(expected - float(-logp[np.arange(len(y)), y].mean())) > 0.05 or eps == 0
    engine.fit(s, tmp_path / "run")
    assert s.history[0]["train_loss"] == pytest.approx(expected, rel=1e-4)


class _Weights(mx.gluon.Block):
    """Four weights and a loss sum(w * x): the gradient is x, whatever w is."""

    def __init__(self):
        super().__init__()
        self.w = self.params.get("w", shape=(4,), init=mx.init.One())

    def forward(self, x):
        return (self.w.data() * x).sum()


def _one_param_steps(cfg, grad, steps, dtype="float32"):
    net = _Weights()
    net.initialize()
    if dtype != "float32":
        net.cast(dtype)
    tr = engine.make_trainer(net, cfg, iters_per_epoch=10)
    x = mx.nd.array(grad, dtype=dtype)
    for _ in range(steps):
        with mx.autograd.record():
            loss = net(x)
        loss.backward()
        tr.step(1)
    return net.w.data().asnumpy().astype(np.float64)


OPT = dict(epochs=2, lr=0.1, momentum=0.9, wd=0.0, lr_schedule="constant", warmup_epochs=0.0)


def test_optimizers_update_as_their_formulas():
    """Two steps of each optimizer with gradient g (over four orders of magnitude) from w = 1:
    sgd (heavy ball): w - lr g, then - lr g (1 + m); nag: w - lr g (1 + m), then - lr g (1 + m + m^2);
    adam: about lr sign(g) per step, whatever |g|."""
    g = np.array([0.01, 0.3, -1.0, 100.0])
    lr, m = OPT["lr"], OPT["momentum"]
    for steps, want in ((1, 1 - lr * g), (2, 1 - lr * g - lr * g * (1 + m))):
        np.testing.assert_allclose(_one_param_steps(RunConfig(optimizer="sgd", **OPT), g, steps), want, rtol=1e-5)
    for steps, want in ((1, 1 - lr * g * (1 + m)), (2, 1 - lr * g * (1 + m) - lr * g * (1 + m + m * m))):
        np.testing.assert_allclose(_one_param_steps(RunConfig(optimizer="nag", **OPT), g, steps), want, rtol=1e-5)
    adam = dict(OPT, lr=1e-3)
    np.testing.assert_allclose(_one_param_steps(RunConfig(optimizer="adam", **adam), g, 1), 1 - 1e-3 * np.sign(g),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_one_param_steps(RunConfig(optimizer="adam", **adam), g, 2),
                               1 - 2e-3 * np.sign(g), rtol=1e-5, atol=1e-6)


def test_float16_weights_are_updated_through_float32_master_copies():
    """lr x g = 1e-4 per step is less than half of float16's spacing below 1.0 (2^-11): without
    float32 master weights (multi_precision) every step rounds back and w stays exactly 1.0; with
    them 20 steps take w to 0.998 (as float16: 0.99805)."""
    cfg = RunConfig(optimizer="sgd", dtype="float16", **dict(OPT, lr=1e-4, momentum=0.0))
    w = _one_param_steps(cfg, np.ones(4), 20, dtype="float16")
    np.testing.assert_allclose(w, 0.998, atol=3e-4)


def test_seed_decides_initial_weights_and_data_order(tiny_data_dir):
    a, b, c = (_session(tiny_data_dir, seed=s, train_limit=256) for s in (1, 1, 2))
    wa, wb, wc = ([p.data().asnumpy() for n, p in x.net.collect_params().items() if n.endswith("weight")
                   and p.data().ndim > 1] for x in (a, b, c))      # conv and dense weights: drawn at random
    assert len(wa) == 11
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not any(np.array_equal(x, y) for x, y in zip(wa, wc))
    order = [x.train_loader._plan(1)[0] for x in (a, b, c)]
    assert np.array_equal(order[0], order[1]) and not np.array_equal(order[0], order[2])


def test_no_hybridize_is_eager(tiny_data_dir):
    assert _session(tiny_data_dir).net._active
    assert not _session(tiny_data_dir, hybridize=False).net._active


def test_nag_without_hybridize_end_to_end(tmp_path, cli_env):
    """--optimizer nag --no-hybridize through the command line: the run saves a NAG state and
    equals the same run compiled (hybridizing changes the speed, not the numbers)."""
    args = [*TINY, "--epochs", 1, "--optimizer", "nag", "--dropout", 0, "--lr", 0.05, "--warmup-epochs", 0,
            "--output-dir", tmp_path]
    assert _invoke("train", *args, "--name", "hyb").exit_code == 0
    r = _invoke("train", *args, "--no-hybridize", "--name", "eager")
    assert r.exit_code == 0, r.output
    assert "hybridize: false" in (tmp_path / "eager" / "config.yaml").read_text()
    states = (ck.select_checkpoint(tmp_path / "eager").file(ck.STATES)).read_bytes()
    assert b"NAG" in states
    p1, p2 = _params(tmp_path / "hyb"), _params(tmp_path / "eager")
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_resume_on_other_devices_and_kvstore_equals_uninterrupted(tmp_path, cli_env):
    """--ctx and --kvstore may change on resume: a run trained on one device, resumed on two with
    kvstore 'local', then on one again with 'device', ends with the weights of the uninterrupted
    one-device run (no BN, no dropout, so the device split does not change the numbers; a constant
    rate, so that the 1-epoch start has the schedule of the 3-epoch run)."""
    args = [*TINY, "--no-batch-norm", "--dropout", 0, "--lr", 0.05, "--lr-schedule", "constant", "--warmup-epochs", 0,
            "--output-dir", tmp_path]
    assert _invoke("train", *args, "--epochs", 3, "--ctx", "cpu:0", "--name", "one").exit_code == 0
    assert _invoke("train", *args, "--epochs", 1, "--ctx", "cpu:0", "--name", "moved").exit_code == 0
    run = tmp_path / "moved"
    r = _invoke("resume", run, "--epochs", 2, "--ctx", "cpu:0,1", "--kvstore", "local")
    assert r.exit_code == 0, r.output
    meta = ck.select_checkpoint(run).meta()
    assert (meta["ctx"], meta["config"]["kvstore"], meta["num_update"]) == ("cpu:0,1", "local", 8)
    r = _invoke("resume", run, "--epochs", 3, "--ctx", "cpu:0", "--kvstore", "device")
    assert r.exit_code == 0, r.output
    assert ck.select_checkpoint(run).meta()["ctx"] == "cpu:0"
    p1, p2 = _params(tmp_path / "one"), _params(run)
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    h1, h2 = (report.read_history(tmp_path / n / "history.csv") for n in ("one", "moved"))
    assert [h["lr"] for h in h2] == pytest.approx([h["lr"] for h in h1], rel=1e-6, abs=1e-12)
    assert [h["test_acc"] for h in h2] == pytest.approx([h["test_acc"] for h in h1], abs=1e-9)
