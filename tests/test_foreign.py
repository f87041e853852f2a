"""Tests for vgg_gluon.foreign: tutorial-layout and own-layout .params files, and the errors."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

from vgg_gluon import models as M
from vgg_gluon.foreign import LAYOUT_MAPPED, LAYOUT_NATIVE, ParamsError, load_params_any, network_order

CTX = mx.cpu()
SHAPE = (3, 32, 32)  # full-width VGG-11 is ~28M parameters at 32 px (130M at 224): keep it small
CONV_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def tutorial_vgg(num_classes: int = 10, flatten: bool = True) -> nn.Sequential:
    """The network of seed 004 (flatten=True) / the Gluon d2l chapter (flatten=False), verbatim."""
    def blk(channel, num):
        net = nn.Sequential()
        with net.name_scope():
            for _ in range(num):
                net.add(nn.Conv2D(channel, kernel_size=3, padding=1, activation="relu"))
            net.add(nn.MaxPool2D(pool_size=2, strides=2))
        return net

    net = nn.Sequential()
    with net.name_scope():
        for num, channel in CONV_ARCH:
            net.add(blk(channel, num))
        if flatten:
            net.add(nn.Flatten())
        net.add(nn.Dense(4096, activation="relu"))
        net.add(nn.Dropout(0.5))
        net.add(nn.Dense(4096, activation="relu"))
        net.add(nn.Dropout(0.5))
        net.add(nn.Dense(num_classes))
    return net


@pytest.fixture(scope="module")
def x():
    rng = np.random.RandomState(0)
    return mx.nd.array(rng.uniform(0, 1, size=(2,) + SHAPE).astype("float32"))


@pytest.fixture(scope="module")
def tutorial_files(tmp_path_factory, x):
    """One trained-looking tutorial net saved three ways, plus the d2l variant; with reference outputs."""
    root = tmp_path_factory.mktemp("foreign")
    mx.random.seed(3)
    out = {}
    for flatten in (True, False):
        net = tutorial_vgg(flatten=flatten)
        net.initialize(mx.init.Xavier())
        y = net(x)  # eval mode: dropout off
        name = "TinyVGG11" if flatten else "d2l_vgg11"
        net.save_parameters(str(root / f"{name}.params"))
        out[name] = (root / f"{name}.params", y.asnumpy())
        if flatten:
            # Old Gluon `save_params`: full prefixed names, in registration order.
            net.collect_params().save(str(root / "old_style.params"))
            out["old_style"] = (root / "old_style.params", y.asnumpy())
    mx.nd.waitall()
    return out


@pytest.mark.parametrize("which", ["TinyVGG11", "d2l_vgg11", "old_style"])
def test_tutorial_layouts_map_exactly(tutorial_files, x, which):
    path, expected = tutorial_files[which]
    net = M.build_vgg("vgg11", 10, width=1.0, fc_units=4096)
    report = load_params_any(net, path, [CTX], input_shape=SHAPE)
    assert report.layout == LAYOUT_MAPPED and report.mapped == 22
    assert "mapped 22 tensors from a tutorial-style layout" in report.message
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    net.hybridize(static_alloc=True, static_shape=True)
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    mx.nd.waitall()


def test_width_mismatch_names_first_tensor_and_leaves_net_alone(tutorial_files):
    path, _ = tutorial_files["TinyVGG11"]
    net = M.build_vgg("vgg11", 10, width=0.25)
    M.initialize(net, [CTX], seed=0, input_shape=SHAPE)
    before = net.features[0][0].weight.data().asnumpy()
    with pytest.raises(ParamsError) as err:
        load_params_any(net, path, [CTX], input_shape=SHAPE)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert "tensor 1 '0.0.weight' has shape (64, 3, 3, 3)" in msg
    assert "vgg11 width 0.25 expects (16, 3, 3, 3) at features.block1.conv1.weight" in msg
    assert "--width 1.0" in msg
    np.testing.assert_array_equal(net.features[0][0].weight.data().asnumpy(), before)


@pytest.mark.parametrize("kwargs, shape, needle", [
    (dict(fc_units=1024), SHAPE, "'6.weight' has shape (4096, 512) but vgg11 width 1.0 expects (1024, 512)"),
    (dict(fc_units=4096), (1, 32, 32), "trained on 3-channel images"),
    (dict(fc_units=4096), (3, 64, 64), "trained on images of about 32 px: use --image-size 32"),
])
def test_other_mismatches(tutorial_files, kwargs, shape, needle):
    path, _ = tutorial_files["TinyVGG11"]
    net = M.build_vgg("vgg11", 10, **kwargs)
    with pytest.raises(ParamsError, match=None) as err:
        load_params_any(net, path, [CTX], input_shape=shape)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_class_count_mismatch(tutorial_files):
    path, _ = tutorial_files["d2l_vgg11"]
    with pytest.raises(ParamsError, match="the file has 10 classes, the network 7"):
        load_params_any(M.build_vgg("vgg11", 7, fc_units=4096), path, [CTX], input_shape=SHAPE)


def test_bn_net_rejects_file_without_bn(tutorial_files):
    path, _ = tutorial_files["TinyVGG11"]
    net = M.build_vgg("vgg11", 10, batch_norm=True)
    with pytest.raises(ParamsError) as err:
        load_params_any(net, path, [CTX], input_shape=SHAPE)
    msg = str(err.value)
    assert "holds 22 tensors but vgg11 width 1.0 with batch norm has 46" in msg
    assert "the file has no batch-norm tensors" in msg and "\n" not in msg


def test_wrong_arch_count(tutorial_files, tmp_path):
    net13 = M.build_vgg("vgg13", 10, width=0.0625, fc_units=8)
    M.initialize(net13, [CTX], seed=0, input_shape=SHAPE)
    net13.save_parameters(str(tmp_path / "v13.params"))
    with pytest.raises(ParamsError, match="vgg-gluon file for another network.*looks like vgg13"):
        load_params_any(M.build_vgg("vgg11", 10, width=0.0625, fc_units=8), tmp_path / "v13.params",
                        [CTX], input_shape=SHAPE)


def _train_one_step(net, x):
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9})
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), mx.nd.array([0, 1]))
    loss.backward()
    trainer.step(x.shape[0])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_own_round_trip(tmp_path, x, batch_norm):
    src = M.build_vgg("vgg11", 10, width=0.125, batch_norm=batch_norm, fc_units=64)
    M.initialize(src, [CTX], seed=5)
    src.hybridize(static_alloc=True, static_shape=True)
    _train_one_step(src, x)  # moves BN running statistics away from their initial values
    expected = src(x).asnumpy()
    src.save_parameters(str(tmp_path / "own.params"))

    dst = M.build_vgg("vgg11", 10, width=0.125, batch_norm=batch_norm, fc_units=64)
    report = load_params_any(dst, tmp_path / "own.params", [CTX], input_shape=SHAPE)
    assert report.layout == LAYOUT_NATIVE
    assert report.mapped == len(dst._collect_params_with_prefix())
    np.testing.assert_allclose(dst(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    mx.nd.waitall()


def test_own_layout_shape_mismatch(tmp_path):
    src = M.build_vgg("vgg11", 10, width=0.125, fc_units=64)
    M.initialize(src, [CTX], seed=0, input_shape=SHAPE)
    src.save_parameters(str(tmp_path / "own.params"))
    dst = M.build_vgg("vgg11", 10, width=0.0625, fc_units=64)
    with pytest.raises(ParamsError) as err:
        load_params_any(dst, tmp_path / "own.params", [CTX], input_shape=SHAPE)
    msg = str(err.value)
    assert "parameter 'features.block1.conv1.weight' has shape (8, 3, 3, 3) in the file" in msg
    assert "expects (4, 3, 3, 3)" in msg and "--width 0.125" in msg


@pytest.mark.parametrize("content", [b"", b"not a params file at all" * 10, "truncated"])
def test_unreadable_files(tmp_path, tutorial_files, content):
    if content == "truncated":
        data = tutorial_files["TinyVGG11"][0].read_bytes()
        content = data[: len(data) // 3]
    bad = tmp_path / "bad.params"
    bad.write_bytes(content)
    net = M.build_vgg("vgg11", 10, width=0.0625, fc_units=8)
    with pytest.raises(ParamsError) as err:
        load_params_any(net, bad, [CTX], input_shape=SHAPE)
    msg = str(err.value)
    assert msg.startswith(f"{bad} is not a readable MXNet .params file (") and "\n" not in msg
    assert "Traceback" not in msg


def test_missing_file_and_unnamed_arrays(tmp_path):
    net = M.build_vgg("vgg11", 10, width=0.0625, fc_units=8)
    with pytest.raises(ParamsError, match="no such file"):
        load_params_any(net, tmp_path / "nope.params", [CTX], input_shape=SHAPE)
    mx.nd.save(str(tmp_path / "list.params"), [mx.nd.ones(3)])
    with pytest.raises(ParamsError, match="unnamed arrays"):
        load_params_any(net, tmp_path / "list.params", [CTX], input_shape=SHAPE)


def test_network_order():
    shuffled = ["10.bias", "2.0.weight", "0.0.bias", "10.weight", "0.0.weight", "1.0.weight", "1.0.bias",
                "2.0.bias", "2.1.bias", "2.1.weight"]
    assert network_order(shuffled) == ["0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias", "2.0.weight",
                                       "2.0.bias", "2.1.weight", "2.1.bias", "10.weight", "10.bias"]
    # Prefixed names keep file order (a sort would put dense0 before sequential0); an export's
    # aux: statistics go back next to their layer.
    prefixed = ["arg:seq0_conv0_weight", "arg:seq0_batchnorm0_gamma", "arg:seq0_batchnorm0_beta",
                "arg:seq0_dense0_weight", "arg:seq0_dense0_bias",
                "aux:seq0_batchnorm0_running_mean", "aux:seq0_batchnorm0_running_var"]
    assert network_order(prefixed) == [prefixed[i] for i in (0, 1, 2, 5, 6, 3, 4)]


def test_infer_architecture(tutorial_files, tmp_path):
    from vgg_gluon.foreign import infer_architecture

    path, _ = tutorial_files["TinyVGG11"]
    assert infer_architecture(path) == dict(arch="vgg11", width=1.0, batch_norm=False, fc_units=4096,
                                            num_classes=10, in_channels=3)
    for arch, width, bn in [("vgg16", 0.3, True), ("vgg19", 0.0625, False), ("vgg13", 0.25, True)]:
        net = M.build_vgg(arch, 7, width=width, batch_norm=bn, fc_units=24)
        M.initialize(net, [CTX], seed=0, input_shape=(1, 32, 32))
        net.save_parameters(str(tmp_path / "n.params"))
        got = infer_architecture(tmp_path / "n.params")
        assert M.scaled_spec(got.pop("arch"), got.pop("width")) == M.scaled_spec(arch, width)
        assert got == dict(batch_norm=bn, fc_units=24, num_classes=7, in_channels=1)
    mx.nd.save(str(tmp_path / "other.params"), {"w": mx.nd.ones((2, 2))})
    assert infer_architecture(tmp_path / "other.params") == {}
    (tmp_path / "bad.params").write_bytes(b"xx")
    with pytest.raises(ParamsError):
        infer_architecture(tmp_path / "bad.params")


def test_conv_bias_before_bn_is_folded(tmp_path, x):
    """gluoncv-style VGG-BN (conv with bias, then BN): biases fold exactly into the running means."""
    width = 0.125
    net = nn.HybridSequential()
    with net.name_scope():
        feats = nn.HybridSequential()
        for num, channel in CONV_ARCH:
            for _ in range(num):
                feats.add(nn.Conv2D(int(channel * width), kernel_size=3, padding=1), nn.BatchNorm(),
                          nn.Activation("relu"))
            feats.add(nn.MaxPool2D(2, 2))
        feats.add(nn.Dense(32, activation="relu"), nn.Dropout(0.5), nn.Dense(32, activation="relu"),
                  nn.Dropout(0.5))
        net.add(feats, nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net(x)
    rng = np.random.RandomState(1)
    for name, p in net._collect_params_with_prefix().items():  # non-trivial biases and BN statistics
        values = rng.uniform(0.5, 1.5, p.shape) if name.endswith("running_var") else rng.normal(0, 0.3, p.shape)
        p.set_data(mx.nd.array(values))
    expected = net(x).asnumpy()
    net.save_parameters(str(tmp_path / "gcv_bn.params"))

    ours = M.build_vgg("vgg11", 10, width=width, batch_norm=True, fc_units=32)
    report = load_params_any(ours, tmp_path / "gcv_bn.params", [CTX], input_shape=SHAPE)
    assert report.layout == LAYOUT_MAPPED and "8 conv biases folded" in report.message
    np.testing.assert_allclose(ours(x).asnumpy(), expected, rtol=1e-4, atol=1e-4)
    mx.nd.waitall()
