"""Tests for vgg_gluon.models: every spec, with and without BN, eager and hybridized, and the summary."""
import mxnet as mx
import numpy as np
import pytest
from conftest import TINY_WIDTH
from mxnet import autograd, gluon

from vgg_gluon import cpu_layers
from vgg_gluon import models as M
from vgg_gluon import netsummary as NS

CTX = mx.cpu()
TINY = TINY_WIDTH  # 64 -> 4 channels: every spec runs in milliseconds at 32 px


def _input(shape, seed=0):
    rng = np.random.RandomState(seed)
    return mx.nd.array(rng.uniform(-1, 1, size=shape).astype("float32"), ctx=CTX)


def _layer_shapes(net: M.VGG, x):
    """(name, output shape) of every layer, by running them one at a time (eager). The whitened
    stem's outputs are counted without the zero channels it may carry on AVX-512 (ZeroPaddedConv2D):
    the network's description does not change with the CPU."""
    out = []
    pad = net.stem_conv.pad_out if isinstance(net.stem_conv, M.ZeroPaddedConv2D) else 0
    for part_name, part in (("features", net.features), ("classifier", net.classifier)):
        for child_name, child in part._children.items():
            if part_name == "features":
                for layer_name, layer in child._children.items():
                    x = layer(x)
                    shape = x.shape
                    if child_name == "stem":
                        assert not x[:, shape[1] - pad:].asnumpy().any()  # the padding is zero
                        shape = (shape[0], shape[1] - pad) + shape[2:]
                    out.append((f"features.{child_name}.{layer_name}", shape))
            else:
                x = child(x)
                out.append((f"classifier.{child_name}", x.shape))
    return out


def _trainable(net):
    return sum(int(np.prod(p.shape)) for p in net.collect_params().values() if p.grad_req != "null")


@pytest.mark.parametrize("arch", sorted(M.VGG_SPECS))
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_spec_eager_hybrid_summary(arch, batch_norm, channels):
    mx.random.seed(42)
    net = M.build_vgg(arch, 10, width=TINY, batch_norm=batch_norm, fc_units=32, in_channels=channels)
    M.initialize(net, [CTX], seed=42)
    x = _input((2, channels, 32, 32))

    eager = net(x)
    mx.nd.waitall()
    assert eager.shape == (2, 10)
    assert np.isfinite(eager.asnumpy()).all()

    rows = NS.layer_summary(net, (channels, 32, 32))
    real = _layer_shapes(net, x[:1])
    assert [(r.name, r.output_shape) for r in rows] == real
    assert NS.count_params(rows) == _trainable(net)
    # BN's running mean/var are parameters too, just not trained.
    n_bn = sum(r.output_shape[1] for r in rows if r.kind == "bn")
    assert sum(int(np.prod(p.shape)) for p in net.collect_params().values()) == NS.count_params(rows) + 2 * n_bn
    assert NS.count_macs(arch, TINY, batch_norm, 32, 10, (channels, 32, 32)) == sum(r.macs for r in rows)

    net.hybridize(static_alloc=True, static_shape=True)
    hybrid = net(x)
    mx.nd.waitall()
    np.testing.assert_allclose(hybrid.asnumpy(), eager.asnumpy(), rtol=1e-4, atol=1e-5)

    # One hybridized training step (BN in training mode, dropout on) runs and gives gradients.
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    with autograd.record():
        loss = loss_fn(net(x), mx.nd.array([1, 2], ctx=CTX))
    loss.backward()
    trainer.step(2)
    mx.nd.waitall()
    assert np.isfinite(loss.asnumpy()).all()


@pytest.mark.parametrize("size", [96, 224])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_larger_inputs_vgg11_quarter_width(size, batch_norm):
    net = M.build_vgg("vgg11", 10, width=0.25, batch_norm=batch_norm)
    M.initialize(net, [CTX], seed=0)
    x = _input((1, 1, size, size))
    y = net(x)
    mx.nd.waitall()
    assert y.shape == (1, 10)
    rows = NS.layer_summary(net, (1, size, size))
    assert [(r.name, r.output_shape) for r in rows] == _layer_shapes(net, x)
    assert NS.count_params(rows) == _trainable(net)


def test_hybridized_non_square_and_odd_sizes():
    net = M.build_vgg("vgg11", 3, width=TINY, fc_units=16)
    M.initialize(net, [CTX], seed=0)
    net.hybridize(static_alloc=True, static_shape=True)
    for shape in [(2, 3, 32, 48), (1, 3, 45, 33)]:
        assert net(_input(shape)).shape == (shape[0], 3)
        rows = NS.layer_summary(net, shape[1:])
        assert rows[-1].output_shape == (1, 3)
    mx.nd.waitall()


def test_tutorial_table_vgg11_224():
    net = M.build_vgg("vgg11", 10)  # width 1: 4096 fc units; analytic, nothing is run
    rows = NS.block_summary(net, (1, 224, 224))
    assert [(r.kind, r.output_shape) for r in rows] == [
        ("block", (1, 64, 112, 112)),
        ("block", (1, 128, 56, 56)),
        ("block", (1, 256, 28, 28)),
        ("block", (1, 512, 14, 14)),
        ("block", (1, 512, 7, 7)),
        ("dense", (1, 4096)),
        ("dropout", (1, 4096)),
        ("dense", (1, 4096)),
        ("dropout", (1, 4096)),
        ("dense", (1, 10)),
    ]
    assert rows[0].name == "features.block1" and rows[-1].name == "classifier.fc3"
    assert sum(r.params for r in rows) == NS.count_params(NS.layer_summary(net, (1, 224, 224)))
    assert "features.block5" in NS.format_summary(rows)


def test_known_imagenet_counts():
    # Published figures for the ImageNet models (3x224x224, 1000 classes, no BN).
    assert NS.count_params(NS.layer_summary(M.build_vgg("vgg11", 1000), (3, 224, 224))) == 132_863_336
    assert NS.count_params(NS.layer_summary(M.build_vgg("vgg16", 1000), (3, 224, 224))) == 138_357_544
    assert NS.count_params(NS.layer_summary(M.build_vgg("vgg19", 1000), (3, 224, 224))) == 143_667_240
    macs = NS.count_macs("vgg16", 1.0, False, None, 1000, (3, 224, 224))
    assert abs(macs - 15.47e9) / 15.47e9 < 0.005


@pytest.mark.parametrize("size", [(31, 32), (32, 16), (28, 28)])
def test_too_small_input_is_value_error(size):
    h, w = size
    net = M.build_vgg("vgg11", 10, width=TINY, fc_units=8)
    M.initialize(net, [CTX], seed=0)
    with pytest.raises(ValueError, match="at least 32x32"):
        net(mx.nd.zeros((1, 1, h, w)))
    with pytest.raises(ValueError, match="at least 32x32"):
        NS.layer_summary(net, (1, h, w))
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.zeros((1, 1, 32, 32)))
    with pytest.raises(ValueError) as err:
        net(mx.nd.zeros((1, 1, h, w)))
    assert "\n" not in str(err.value)
    mx.nd.waitall()


def test_wrong_channel_count_after_init_is_value_error():
    net = M.build_vgg("vgg11", 10, width=TINY, fc_units=8)
    M.initialize(net, [CTX], seed=0, input_shape=(1, 32, 32))
    assert net.in_channels == 1
    with pytest.raises(ValueError, match="1-channel"):
        net(mx.nd.zeros((1, 3, 32, 32)))


def test_scaled_spec_and_fc_units():
    assert M.scaled_spec("vgg11", 1.0) == M.VGG_SPECS["vgg11"]
    assert M.scaled_spec("vgg11", 0.25) == ((1, 16), (1, 32), (2, 64), (2, 128), (2, 128))
    assert M.scaled_spec("vgg16", 0.001) == ((2, 1), (2, 1), (3, 1), (3, 1), (3, 1))
    assert M.default_fc_units(1.0) == 4096 and M.default_fc_units(0.25) == 1024
    assert M.default_fc_units(1e-6) == 1
    assert M.min_image_size() == 32
    with pytest.raises(ValueError, match="vgg11, vgg13, vgg16, vgg19"):
        M.scaled_spec("vgg12", 1.0)
    with pytest.raises(ValueError):
        M.scaled_spec("vgg11", 0.0)
    net = M.build_vgg("vgg13", 5, width=0.5)
    assert net.fc_units == 2048 and net.spec == M.scaled_spec("vgg13", 0.5)


def test_structure_and_names():
    for bn in (False, True):
        net = M.build_vgg("vgg11", 10, width=TINY, batch_norm=bn)
        assert len(net.features) == 5 and len(net.classifier) == 5
        block1 = list(net.features[0]._children)
        assert block1 == (["conv1", "bn1", "relu1", "pool"] if bn else ["conv1", "relu1", "pool"])
        names = list(net._collect_params_with_prefix())
        assert names[0] == "features.block1.conv1.weight"
        assert names[-1] == "classifier.fc3.bias"
        # With BN the conv bias is redundant (BN's beta is the shift), so there is none.
        assert ("features.block1.conv1.bias" in names) is (not bn)
        assert ("features.block1.bn1.running_var" in names) is bn


def test_seeded_initialize_is_reproducible_and_keeps_loaded_weights():
    def weights(seed):
        net = M.build_vgg("vgg11", 10, width=TINY, batch_norm=True, fc_units=16)
        M.initialize(net, [CTX], seed=seed, input_shape=(3, 32, 32))
        return net, {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}

    net, a = weights(7)
    _, b = weights(7)
    _, c = weights(8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["features.block1.conv1.weight"], c["features.block1.conv1.weight"])
    # gamma 1, beta 0, conv weights He-scaled (std ~ sqrt(2 / fan_out))
    assert np.all(a["features.block1.bn1.gamma"] == 1) and np.all(a["features.block1.bn1.beta"] == 0)
    w = a["features.block5.conv2.weight"]
    assert abs(w.std() - np.sqrt(2.0 / (w.shape[0] * 9))) < 0.25 * np.sqrt(2.0 / (w.shape[0] * 9))
    # A second initialize must not wipe weights (e.g. after loading a checkpoint).
    M.initialize(net, [CTX], seed=99)
    assert np.array_equal(net.features[0][0].weight.data().asnumpy(), a["features.block1.conv1.weight"])


def test_initialize_on_two_contexts():
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = M.build_vgg("vgg11", 4, width=TINY, fc_units=8)
    M.initialize(net, ctxs, seed=1, input_shape=(1, 32, 32))
    w = net.features[0][0].weight
    assert set(w.list_ctx()) == set(ctxs)
    np.testing.assert_array_equal(w.data(ctxs[0]).asnumpy(), w.data(ctxs[1]).asnumpy())


def test_vgg_block_halves_and_names_children():
    block = M.vgg_block(2, 8, batch_norm=True)
    assert list(block._children) == ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool"]
    block.initialize()
    block.hybridize()
    assert block(mx.nd.zeros((1, 3, 10, 12))).shape == (1, 8, 5, 6)
    mx.nd.waitall()


def test_archs_of_the_config_are_the_spec_table():
    from vgg_gluon.config import ACTIVATIONS, ARCHS
    assert set(ARCHS) == set(M.VGG_SPECS) and set(M.LAYOUTS) <= set(ARCHS)
    assert ACTIVATIONS == M.ACTIVATIONS


def test_classic_rows_are_unchanged():
    # The paper's configurations (and with them the tutorial .params mapping) stay as they were.
    assert M.VGG_SPECS["vgg11"] == ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
    assert M.VGG_SPECS["vgg19"] == ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))
    assert all(M.layout(a) == M.Layout() for a in M.CLASSIC_ARCHS)
    names = [n.split("_", 1)[1] for n in M.build_vgg("vgg11", 10, width=TINY, batch_norm=True).collect_params()]
    assert names[:3] == ["features_block1_conv0_weight", "features_block1_batchnorm0_gamma",
                         "features_block1_batchnorm0_beta"]
    assert names[-2:] == ["classifier_dense2_weight", "classifier_dense2_bias"]


@pytest.mark.parametrize("channels", [1, 3])
def test_fast_row_layout(channels):
    """fast3: 2x2 stem with 2*C*4 filters, pool after each block's first conv, one Dense, 1/9."""
    net = M.build_vgg("fast3", 10, width=0.125, batch_norm=True, in_channels=channels,
                      opts=M.LayerOptions(activation="gelu", bn_scale=False, bn_momentum=0.4, dirac_init=True))
    M.initialize(net, [CTX], seed=0)
    x = _input((2, channels, 28, 28))
    assert net(x).shape == (2, 10)
    assert net.stem_conv.weight.shape == (2 * channels * 4, channels, 2, 2)
    shapes = dict(_layer_shapes(net, x[:1]))
    assert shapes["features.stem.conv"] == (1, 8 * channels, 27, 27)
    assert shapes["features.block1.pool"] == (1, 8, 13, 13) and shapes["features.block3.act2"] == (1, 32, 3, 3)
    bn = [p for n, p in net.collect_params().items() if n.endswith("_gamma")]
    assert bn and all(p.grad_req == "null" for p in bn)  # --no-bn-scale: only the shift trains
    # Identity (dirac) init: block2.conv2's first filters pass their own channel through.
    w = net.features[2][4].weight.data().asnumpy()
    assert w[0, 0, 1, 1] == 1 and w[0, 1, 1, 1] == 0 and w[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match="too small"):
        net(_input((1, channels, 8, 8)))


def test_fast3w_is_airbench95s_widths_on_the_fast_layout():
    """fast3w: airbench95's 128/384/384 channels (airbench94 widened), laid out as fast3."""
    assert M.VGG_SPECS["fast3w"] == ((2, 128), (2, 384), (2, 384)) and M.layout("fast3w") == M.layout("fast3")
    net = M.build_vgg("fast3w", 10, width=0.0625, batch_norm=True, in_channels=3,
                      opts=M.LayerOptions(activation="gelu", bn_scale=False, dirac_init=True))
    M.initialize(net, [CTX], seed=0)
    x = _input((2, 3, 32, 32))
    assert net(x).shape == (2, 10)
    shapes = dict(_layer_shapes(net, x[:1]))
    assert shapes["features.block1.pool"] == (1, 8, 15, 15) and shapes["features.block3.act2"] == (1, 24, 3, 3)


@pytest.mark.parametrize("channels, fix", [(3, "pad"), (1, "pad"), (3, "relayout")])
def test_avx512_layers_compute_the_same_net(monkeypatch, tmp_path, channels, fix):
    """On AVX-512 the whitened stem runs with 32 (RGB) or 16 (grey) filters, the extra ones zero
    (cpu_layers.ZeroPaddedConv2D), and without that padding the BN after it goes through the plain
    layout (cpu_layers.RelayoutBatchNorm). Both are speed fixes only: same parameter names, shapes
    and seeded init, the same outputs and gradients, and checkpoints load both ways."""
    opts = M.LayerOptions(activation="gelu", bn_scale=False, bn_momentum=0.6, dirac_init=True)
    nets = {}
    for avx512 in (False, True):
        monkeypatch.setattr(cpu_layers._env, "onednn_uses_avx512", lambda v=avx512: v)
        if fix == "relayout":
            monkeypatch.setattr(M, "stem_padding", lambda c: 0)
        net = M.build_vgg("fast3", 10, width=0.25, batch_norm=True, in_channels=channels, opts=opts)
        M.initialize(net, [CTX], seed=0, input_shape=(channels, 32, 32))
        net.hybridize(static_alloc=True)
        nets[avx512] = net
    plain, fast = nets[False], nets[True]
    conv1, bn1 = fast.features[1][0], fast.features[1][2]
    stem = 2 * channels * 4
    if fix == "pad":
        assert isinstance(fast.stem_conv, M.ZeroPaddedConv2D) and fast.stem_conv.pad_out == 16 - stem % 16
        assert isinstance(conv1, M.ZeroPaddedConv2D) and conv1.pad_in == fast.stem_conv.pad_out
        assert type(bn1) is M.nn.BatchNorm
    else:
        assert type(fast.stem_conv) is M.nn.Conv2D and isinstance(bn1, M.RelayoutBatchNorm)
    assert type(plain.stem_conv) is M.nn.Conv2D and type(plain.features[1][2]) is M.nn.BatchNorm
    assert type(fast.features[2][2]) is M.nn.BatchNorm  # a conv with 64 inputs needs neither
    assert list(plain._collect_params_with_prefix()) == list(fast._collect_params_with_prefix())
    for p, q in zip(plain.collect_params().values(), fast.collect_params().values()):
        assert p.name[len(plain.prefix):] == q.name[len(fast.prefix):] and p.shape == q.shape
        np.testing.assert_array_equal(p.data().asnumpy(), q.data().asnumpy())
    x = _input((8, channels, 32, 32))
    grads = []
    for net in (plain, fast):
        with autograd.record():
            out = net(x)
        out.backward()
        grads.append((out.asnumpy(), [p.grad().asnumpy() for p in net.collect_params().values()
                                      if p.grad_req != "null"]))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))
    fast.save_parameters(str(tmp_path / "fast.params"))
    plain.load_parameters(str(tmp_path / "fast.params"), ctx=CTX)
    np.testing.assert_allclose(plain(x).asnumpy(), fast(x).asnumpy(), rtol=1e-5, atol=1e-6)
    assert not M.needs_relayout(3) and not M.needs_relayout(None)


def test_channel_padding():
    pads = {c: cpu_layers.channel_padding(c) for c in (None, 0, 1, 3, 4, 8, 16, 24, 32, 40)}
    if cpu_layers._env.onednn_uses_avx512():
        assert pads == {None: 0, 0: 0, 1: 0, 3: 0, 4: 0, 8: 8, 16: 0, 24: 8, 32: 0, 40: 8}
    else:
        assert set(pads.values()) == {0}


def test_no_cpu_fast_paths_for_a_network_on_gpus(monkeypatch):
    """The padded stem and the relayout are for oneDNN: a run on GPUs builds the plain layers."""
    from vgg_gluon import session
    from vgg_gluon.config import RunConfig
    monkeypatch.setattr(cpu_layers._env, "onednn_uses_avx512", lambda: True)
    cfg = RunConfig(dataset="cifar10", arch="fast3", width=0.25, batch_norm=True)
    on_cpu = session.build_network(cfg, 10, [mx.cpu(0), mx.cpu(1)])
    on_gpu = session.build_network(cfg, 10, [mx.gpu(0), mx.gpu(1)])
    assert isinstance(on_cpu.stem_conv, M.ZeroPaddedConv2D)
    assert type(on_gpu.stem_conv) is M.nn.Conv2D and type(on_gpu.features[1][0]) is M.nn.Conv2D
    assert type(on_gpu.features[1][2]) is M.nn.BatchNorm
