import json
import os
import pickle

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from vgg_gluon import checkpoint as ck
from vgg_gluon import models
from vgg_gluon.config import RunConfig
from vgg_gluon.engine import make_trainer


def _net_and_trainer(optimizer="sgd", ctx=(mx.cpu(0),), steps=3):
    mx.random.seed(0)
    net = models.build_vgg("vgg11", 10, width=0.0625, batch_norm=True, fc_units=32)
    models.initialize(net, list(ctx), seed=0)
    cfg = RunConfig(optimizer=optimizer, epochs=2, lr=0.05, warmup_epochs=0.5)
    net(mx.nd.zeros((1, 1, 32, 32), ctx=ctx[0]))
    tr = make_trainer(net, cfg, iters_per_epoch=4)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.uniform(shape=(4 * len(ctx), 1, 32, 32))
    y = mx.nd.array(np.arange(4 * len(ctx)) % 10)
    for _ in range(steps):
        xs = gluon.utils.split_and_load(x, list(ctx))
        ys = gluon.utils.split_and_load(y, list(ctx))
        with autograd.record():
            ls = [loss(net(a), b) for a, b in zip(xs, ys)]
        autograd.backward(ls)
        tr.step(x.shape[0])
    mx.nd.waitall()
    return net, tr


def _save(run, net, tr, epoch, acc=0.5, **kw):
    return ck.save_checkpoint(run, net, tr, {"config": RunConfig().to_dict(), "metrics": {"test_acc": acc}},
                              epoch=epoch, **kw)


def test_save_commits_manifest_and_pointers(tmp_path):
    net, tr = _net_and_trainer()
    c = _save(tmp_path, net, tr, 1, is_best=True)
    assert sorted(p.name for p in c.path.iterdir()) == sorted([ck.PARAMS, ck.STATES, ck.META, ck.MANIFEST])
    ck.verify(c)
    assert json.loads((tmp_path / "last.json").read_text())["checkpoint"] == "epoch-0001"
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "epoch-0001"
    assert not list(tmp_path.glob(".tmp-*"))


def test_retention_keeps_last_n_and_best(tmp_path):
    net, tr = _net_and_trainer()
    _save(tmp_path, net, tr, 1, acc=0.9, is_best=True, keep_last=2)
    for e in range(2, 6):
        _save(tmp_path, net, tr, e, acc=0.1, keep_last=2)
    names = sorted(c.name for c in ck.list_checkpoints(tmp_path))
    assert names == ["epoch-0001", "epoch-0004", "epoch-0005"]
    assert ck.select_checkpoint(tmp_path, "best").name == "epoch-0001"
    assert ck.select_checkpoint(tmp_path, "last").name == "epoch-0005"


@pytest.mark.parametrize("victim", [ck.PARAMS, ck.STATES, ck.META])
@pytest.mark.parametrize("damage", ["empty", "truncate", "flip", "drop-last-byte"])
def test_corruption_is_detected_and_previous_checkpoint_used(tmp_path, victim, damage):
    net, tr = _net_and_trainer()
    _save(tmp_path, net, tr, 1)
    c2 = _save(tmp_path, net, tr, 2)
    f = c2.file(victim)
    data = bytearray(f.read_bytes())
    if damage == "empty":
        data = b""
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "drop-last-byte":
        data = data[:-1]
    else:
        data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="corrupted"):
        ck.verify(c2)
    assert ck.select_checkpoint(tmp_path, "last").name == "epoch-0001"


def test_all_corrupt_is_one_clear_error(tmp_path):
    net, tr = _net_and_trainer()
    c = _save(tmp_path, net, tr, 1)
    c.file(ck.PARAMS).write_bytes(b"")
    with pytest.raises(ck.CheckpointError) as e:
        ck.select_checkpoint(tmp_path)
    assert "corrupted" in str(e.value) and "\n" not in str(e.value)


def test_newer_format_is_refused(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"format_version": ck.FORMAT_VERSION + 1, "epoch": 1, "config": {}}))
    with pytest.raises(ck.CheckpointError, match="newer vgg-gluon"):
        ck.read_meta(meta)


def test_leftover_temporaries_are_removed(tmp_path):
    (tmp_path / ".tmp-epoch-0003-123").mkdir()
    (tmp_path / ".tmp-last.json.55").write_text("x")
    assert ck.cleanup_temp(tmp_path) == 2
    assert not list(tmp_path.iterdir())


def _steps(net, tr, ctx, n, seed=7):
    """n more training steps on fixed data (the same for every caller)."""
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)   # the same dropout masks
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(n):
        x = mx.nd.array(rng.uniform(size=(4 * len(ctx), 1, 32, 32)))
        y = mx.nd.array(rng.integers(0, 10, 4 * len(ctx)))
        xs, ys = gluon.utils.split_and_load(x, list(ctx)), gluon.utils.split_and_load(y, list(ctx))
        with autograd.record():
            ls = [loss(net(a), b) for a, b in zip(xs, ys)]
        autograd.backward(ls)
        tr.step(x.shape[0])
    mx.nd.waitall()


def _copy_weights(src, dst):
    for p, q in zip(src.collect_params().values(), dst.collect_params().values()):
        q.set_data(p.data())


def _updaters(tr):
    """Where a trainer's optimizer state lives: one updater per device, or the kvstore's one
    (update_on_kvstore, MXNet's choice for kvstore 'device' with several devices)."""
    return [tr._kvstore._updater] if tr._update_on_kvstore else tr._updaters


def _assert_same_training_state(tr_a, tr_b, ctx):
    """Everything a step reads: the update count, the schedule, and every device's optimizer state."""
    oa, ob = tr_a._optimizer, tr_b._optimizer
    assert type(oa) is type(ob) and ob.num_update == oa.num_update
    assert ob._index_update_count == oa._index_update_count
    for u in (0, oa.num_update, 7):
        assert ob.lr_scheduler(u) == oa.lr_scheduler(u)
    assert tr_a._update_on_kvstore == tr_b._update_on_kvstore
    assert len(_updaters(tr_b)) == len(_updaters(tr_a)) == (1 if tr_a._update_on_kvstore else len(ctx))
    for ua, ub in zip(_updaters(tr_a), _updaters(tr_b)):
        assert ub.optimizer is ob
        assert ua.states.keys() == ub.states.keys()
        for k in ua.states:
            a = ua.states[k] if isinstance(ua.states[k], (list, tuple)) else [ua.states[k]]
            b = ub.states[k] if isinstance(ub.states[k], (list, tuple)) else [ub.states[k]]
            assert len(a) == len(b), k
            for x, y in zip(a, b):
                assert (x is None) == (y is None), k
                if x is not None:
                    np.testing.assert_array_equal(x.asnumpy(), y.asnumpy(), err_msg=str(k))


@pytest.mark.parametrize("optimizer", ["sgd", "nag", "adam"])
@pytest.mark.parametrize("ctx", [(mx.cpu(0),), (mx.cpu(0), mx.cpu(1))], ids=["1dev", "2dev"])
def test_restricted_states_load_equals_mxnet_load(tmp_path, optimizer, ctx):
    """Our loader restores what MXNet's own Trainer.load_states restores, on every device, and the
    training that follows is the one the saving trainer would have done."""
    net, tr = _net_and_trainer(optimizer, ctx=ctx)
    tr.save_states(str(tmp_path / "s.states"))
    ours_net, ours = _net_and_trainer(optimizer, ctx=ctx, steps=1)
    # The saved weights first, as resume loads them (with update_on_kvstore, a later set_data
    # resets the kvstore and with it the optimizer state).
    _copy_weights(net, ours_net)
    ck.load_trainer_states(ours, tmp_path / "s.states")
    ref_net, ref = _net_and_trainer(optimizer, ctx=ctx, steps=1)
    ref.load_states(str(tmp_path / "s.states"))
    _assert_same_training_state(ref, ours, ctx)
    _assert_same_training_state(tr, ours, ctx)
    # Continued from the same weights, the loaded trainer trains exactly as the saving one.
    _steps(net, tr, ctx, 2)
    _steps(ours_net, ours, ctx, 2)
    for p, q in zip(net.collect_params().values(), ours_net.collect_params().values()):
        if p.grad_req == "null":
            continue    # BatchNorm statistics: per device, not the optimizer's
        for c in ctx:
            np.testing.assert_array_equal(p.data(c).asnumpy(), q.data(c).asnumpy(), err_msg=f"{p.name} {c}")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_states_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.states"
    evil.write_bytes(pickle.dumps(({0: _Evil(marker)}, None)))
    net, tr = _net_and_trainer()
    with pytest.raises(ck.CheckpointError, match="refused to load 'posix.system'|refused to load"):
        ck.load_trainer_states(tr, evil)
    assert not marker.exists()
    # A plain pickle that is not an optimizer state is refused too.
    other = tmp_path / "other.states"
    other.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ck.CheckpointError, match="not an MXNet optimizer state"):
        ck.load_trainer_states(tr, other)


def test_states_of_other_optimizer_refused(tmp_path):
    net, tr = _net_and_trainer("adam")
    tr.save_states(str(tmp_path / "adam.states"))
    net2, tr2 = _net_and_trainer("sgd")
    with pytest.raises(ck.CheckpointError, match="Adam optimizer state"):
        ck.load_trainer_states(tr2, tmp_path / "adam.states")


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "f.json"
    ck.atomic_write_text(p, "one")
    ck.atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]
