"""VGG networks (Simonyan & Zisserman 2014) as data: a spec table, one builder, a layer summary.

The architecture is the table `VGG_SPECS`; `build_vgg` turns a row of it (optionally narrowed by a
width multiplier, the tutorials' ``ratio = 4``) into a Gluon `HybridBlock`. Nothing is tied to one
input resolution or channel count: convolutions and the first `Dense` infer their input size on the
first forward pass (deferred initialization).

Children are registered under readable names, so the structural parameter names that
`save_parameters` writes read like ``features.block2.conv1.weight`` or ``classifier.fc3.bias``
instead of ``features.1.0.weight``; error messages and checkpoint diffs can then name layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from vgg_gluon import config
from vgg_gluon.cpu_layers import RelayoutBatchNorm, ZeroPaddedConv2D, channel_padding, needs_relayout

log = logging.getLogger(__name__)

Spec = Tuple[Tuple[int, int], ...]

#: (num_convs, channels) per block: configurations A, B, D and E of Simonyan & Zisserman (2014),
#: then the fast-training rows (3 blocks of 2 convs, airbench94's shape, and airbench95's wider
#: fast3w; their layout is in LAYOUTS).
VGG_SPECS: Dict[str, Spec] = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg13": ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
    "fast3": ((2, 64), (2, 256), (2, 256)),
    "fast3s": ((2, 64), (2, 128), (2, 256)),
    "fast3w": ((2, 128), (2, 384), (2, 384)),   # airbench95's widths
}


@dataclass(frozen=True)
class Layout:
    """How a row of VGG_SPECS is laid out around its blocks (the classic VGG unless LAYOUTS says).

    pool: "end" (VGG: [conv-BN-act] x n, then pool) or "first" (airbench: conv, pool, BN, act,
    then the block's other convs at half resolution, which costs far fewer FLOPs).
    stem: side of a patch layer before the blocks (0: none; 2: a 2x2 conv without padding,
    2 x C x 2 x 2 filters, which `whiten` can initialize from the data).
    head: "mlp" (fc1 drop1 fc2 drop2 fc3) or "linear" (global max-pool, one Dense without bias,
    logits multiplied by `logit_scale`).
    """
    pool: str = "end"
    stem: int = 0
    head: str = "mlp"
    logit_scale: float = 1.0


#: Rows whose layout differs from the classic VGG one (airbench94 and airbench95, Jordan 2024).
LAYOUTS: Dict[str, Layout] = {
    "fast3": Layout(pool="first", stem=2, head="linear", logit_scale=1 / 9),
    "fast3s": Layout(pool="first", stem=2, head="linear", logit_scale=1 / 9),
    "fast3w": Layout(pool="first", stem=2, head="linear", logit_scale=1 / 9),
}

#: The configurations of the paper (the tutorial .params mapping knows only these): config's list.
CLASSIC_ARCHS = config.CLASSIC_ARCHS
ACTIVATIONS = ("relu", "gelu")


def layout(arch: str) -> Layout:
    """The row's layout (classic VGG for the paper's four)."""
    return LAYOUTS.get(arch, Layout())

#: Width of the two hidden fully connected layers at width 1.0.
BASE_FC_UNITS = 4096

#: Five 2x2/2 max-pools halve the image five times: below 32 px the last map would be empty.
_MIN_IMAGE_SIZE = 2 ** 5


def scaled_spec(arch: str, width: float) -> Spec:
    """`VGG_SPECS[arch]` with every channel count multiplied by `width` (int, at least 1)."""
    if arch not in VGG_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(VGG_SPECS))}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return tuple((n, max(1, int(c * width))) for n, c in VGG_SPECS[arch])


def default_fc_units(width: float) -> int:
    """Hidden units of the two hidden dense layers for a width multiplier: round(4096 * width)."""
    return max(1, int(round(BASE_FC_UNITS * width)))


def format_width(width: float) -> str:
    """A width multiplier as a user would type it: 1.0, 0.25, 0.0625."""
    text = f"{width:.6g}"
    return text if any(ch in text for ch in ".e") else text + ".0"


def min_image_size() -> int:
    """Smallest height/width the network accepts (32: five 2x2 pools)."""
    return _MIN_IMAGE_SIZE


def check_image_size(height: int, width: int, minimum: int = _MIN_IMAGE_SIZE) -> None:
    """Raise ValueError (one line) if an image of height x width is too small for the pools."""
    if height < minimum or width < minimum:
        pools = "five 2x2 max-pools" if minimum == _MIN_IMAGE_SIZE else "2x2 max-pools"
        raise ValueError(
            f"input images of {height}x{width} px are too small for VGG: its {pools} "
            f"need at least {minimum}x{minimum} px (resize the data)"
        )


# --- layer naming -------------------------------------------------------------------------------
# One place decides the child names, used both to build the network and to describe it
# analytically (layer_summary), so the two cannot drift apart.

def _block_layer_names(num_convs: int, batch_norm: bool, pool: str = "end") -> List[Tuple[str, str]]:
    """(child name, kind) of the layers inside one VGG block (the same layout for every block)."""
    layers: List[Tuple[str, str]] = []
    act = "relu" if pool == "end" else "act"   # the classic names stay as they were
    for j in range(1, num_convs + 1):
        layers.append((f"conv{j}", "conv"))
        if pool == "first" and j == 1:
            layers.append(("pool", "pool"))
        if batch_norm:
            layers.append((f"bn{j}", "bn"))
        layers.append((f"{act}{j}", "relu"))
    if pool == "end":
        layers.append(("pool", "pool"))
    return layers


_CLASSIFIER_LAYERS: Tuple[Tuple[str, str], ...] = (
    ("fc1", "dense"), ("drop1", "dropout"), ("fc2", "dense"), ("drop2", "dropout"), ("fc3", "dense"),
)


# He-style init suits ReLU nets; set per layer so a plain `net.initialize()` gets it too.
# Convs: gluoncv's VGG choice (gaussian, fan-out, magnitude 2 = Kaiming normal, fan_out).
# Dense: Kaiming on fan-in keeps the activation variance of the wide FC layers stable.
def _conv_init() -> mx.init.Initializer:
    return mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2)


def _dense_init() -> mx.init.Initializer:
    return mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)


# The output layer starts small (torchvision's and gluoncv's VGG use N(0, 0.01)): with He init its
# logits had a std of ~3 in training mode (dropout doubles the surviving activations), an initial
# loss of 5-6 instead of ln(10) = 2.3, and the first hundred steps went to undoing it.
def _output_init() -> mx.init.Initializer:
    return mx.init.Normal(0.01)


class _DiracUniform(mx.init.Initializer):
    """PyTorch's default conv init (uniform, bound 1/sqrt(fan_in)) with the first min(out, in)
    filters set to the identity (airbench's "implicit residual": a fresh block passes its input on)."""

    def _init_weight(self, name, arr):
        out_c, in_c = arr.shape[0], arr.shape[1]
        fan_in = in_c * arr.shape[2] * arr.shape[3]
        bound = 1.0 / np.sqrt(fan_in)
        arr[:] = mx.nd.random.uniform(-bound, bound, shape=arr.shape, ctx=arr.context)
        k = min(out_c, in_c)
        w = arr.asnumpy()
        w[:k] = 0.0
        w[np.arange(k), np.arange(k), arr.shape[2] // 2, arr.shape[3] // 2] = 1.0
        arr[:] = w


class Scale(gluon.HybridBlock):
    """Multiply by a constant (airbench's 1/9 on the logits of a BN net without BN scale)."""

    def __init__(self, scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def hybrid_forward(self, F, x):  # noqa: N803 - Gluon's signature
        return x * self.scale


@dataclass(frozen=True)
class LayerOptions:
    """Training-recipe choices inside the layers (the classic VGG: ReLU, Gluon's BatchNorm)."""
    activation: str = "relu"
    bn_scale: bool = True          # False: BN gamma fixed at 1 (airbench: only the shift is learned)
    bn_momentum: float = 0.9       # Gluon's convention: running = m * running + (1 - m) * batch
    bn_eps: float = 1e-5
    dirac_init: bool = False       # identity-initialized convs (set for the fast layouts)
    cpu_fast_paths: bool = True    # cpu_layers where oneDNN wants them (off for a network on GPUs)


def _activation(name: str) -> gluon.HybridBlock:
    if name == "gelu":
        return nn.GELU()
    return nn.Activation("relu")


def _make_layer(kind: str, channels: int, batch_norm: bool,
                opts: LayerOptions = LayerOptions(), relayout: bool = False,
                in_channels: int = 0, pad_in: int = 0) -> gluon.HybridBlock:
    if kind == "conv":
        # With BN right after, a conv bias is redundant: BN subtracts the batch mean (removing
        # any constant) and adds its own learned shift `beta`. Dropping it saves parameters and
        # one broadcast add per conv.
        kwargs = dict(kernel_size=3, padding=1, use_bias=not batch_norm,
                      weight_initializer=_DiracUniform() if opts.dirac_init else _conv_init())
        if pad_in:
            return ZeroPaddedConv2D(channels, in_channels=in_channels, pad_in=pad_in, **kwargs)
        return nn.Conv2D(channels, **kwargs)
    if kind == "bn":
        cls = RelayoutBatchNorm if relayout else nn.BatchNorm
        if opts == LayerOptions():
            return cls()
        return cls(momentum=opts.bn_momentum, epsilon=opts.bn_eps, scale=opts.bn_scale)
    if kind == "relu":
        return _activation(opts.activation)
    if kind == "pool":
        return nn.MaxPool2D(pool_size=2, strides=2)
    raise AssertionError(kind)


def vgg_block(num_convs: int, channels: int, *, batch_norm: bool = False,
              prefix: Optional[str] = None, pool: str = "end",
              opts: LayerOptions = LayerOptions(), in_channels: Optional[int] = None,
              pad_in: int = 0) -> nn.HybridSequential:
    """[3x3 conv (pad 1) (+ BN) + ReLU] x num_convs, then a 2x2/2 max-pool: halves H and W.
    With pool="first", the pool follows the first conv (airbench's ConvGroup). `in_channels`
    (when known) lets the first BN avoid a slow oneDNN path (`needs_relayout`); `pad_in` zero
    input channels follow them when the layer before pads its output (cpu_layers.ZeroPaddedConv2D).

    Children are named conv1, bn1, relu1, ..., pool (they become part of the parameter names).
    """
    block = nn.HybridSequential(prefix=prefix)
    with block.name_scope():
        for name, kind in _block_layer_names(num_convs, batch_norm, pool):
            relayout = name == "bn1" and opts.cpu_fast_paths and needs_relayout((in_channels or 0) + pad_in)
            first = name == "conv1"
            block.register_child(_make_layer(kind, channels, batch_norm, opts, relayout,
                                             in_channels=in_channels if first else 0,
                                             pad_in=pad_in if first else 0), name)
    return block


def stem_channels(lay: Layout, in_channels: int) -> int:
    """Filters of the patch layer: +/- every eigenvector of the k x k x C patch covariance."""
    return 2 * in_channels * lay.stem * lay.stem


def stem_padding(channels: int) -> int:
    """Zero filters the stem runs with on this CPU (cpu_layers.channel_padding: 24 -> 32 on
    AVX-512); benchmarks/step_time.py --no-pad replaces it."""
    return channel_padding(channels)


class VGG(gluon.HybridBlock):
    """VGG feature extractor (blocks of 3x3 convs + 2x2 max-pool) and a dense classifier.

    The classic rows: five blocks and a 3-layer classifier. Rows with a `Layout` in LAYOUTS may
    have another number of blocks, a 2x2 patch stem and a one-Dense head.

    Attributes:
        features: `HybridSequential` of the blocks named ``block1`` .. ``blockN`` (after ``stem``).
        classifier: `HybridSequential` ``fc1 drop1 fc2 drop2 fc3`` (or ``pool fc scale``).
        arch, spec, num_classes, batch_norm, fc_units, dropout, width: the configuration, kept so
            the network can be described (`layer_summary`) and matched against files.
    """

    # 61 lines: the children are registered in the order and under the names that become the
    # parameter names of every checkpoint, so they stay in one readable block.
    def __init__(self, spec: Sequence[Tuple[int, int]], num_classes: int, *, batch_norm: bool = False,
                 fc_units: int = BASE_FC_UNITS, dropout: float = 0.5, arch: str = "vgg",
                 width: float = 1.0, layout: Optional[Layout] = None,
                 opts: LayerOptions = LayerOptions(), in_channels: Optional[int] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layout = layout or Layout()
        lay = self.layout
        if lay == Layout() and len(spec) != 5:
            raise ValueError(f"a VGG spec has 5 blocks, got {len(spec)}")
        if not spec:
            raise ValueError("a VGG spec needs at least one block")
        if lay.stem and not in_channels:
            raise ValueError(f"{arch}: the patch stem needs the number of input channels")
        if num_classes < 1 or fc_units < 1:
            raise ValueError(f"num_classes and fc_units must be >= 1, got {num_classes} and {fc_units}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spec: Spec = tuple((int(n), int(c)) for n, c in spec)
        self.num_classes = int(num_classes)
        self.batch_norm = bool(batch_norm)
        self.fc_units = int(fc_units)
        self.dropout = float(dropout)
        self.arch = arch
        self.width = float(width)
        self.opts = opts
        self.stem_channels = stem_channels(lay, int(in_channels)) if lay.stem else 0

        with self.name_scope():
            self.features = nn.HybridSequential(prefix="features_")
            with self.features.name_scope():
                pad = 0
                if lay.stem:
                    pad = stem_padding(self.stem_channels) if opts.cpu_fast_paths else 0
                    stem = nn.HybridSequential(prefix="stem_")
                    with stem.name_scope():
                        # Frozen when whitened (fasttrain.whiten_stem); its bias always trains.
                        kw = dict(kernel_size=lay.stem, padding=0, use_bias=True, weight_initializer=_conv_init())
                        conv = (ZeroPaddedConv2D(self.stem_channels, in_channels=int(in_channels), pad_out=pad, **kw)
                                if pad else nn.Conv2D(self.stem_channels, **kw))
                        stem.register_child(conv, "conv")
                        stem.register_child(_activation(opts.activation), "act")
                    self.features.register_child(stem, "stem")
                cin = self.stem_channels or in_channels
                for b, (num_convs, channels) in enumerate(self.spec, start=1):
                    block = vgg_block(num_convs, channels, batch_norm=self.batch_norm, prefix=f"block{b}_",
                                      pool=lay.pool, opts=opts, in_channels=cin, pad_in=pad if b == 1 else 0)
                    cin = channels
                    self.features.register_child(block, f"block{b}")

            self.classifier = nn.HybridSequential(prefix="classifier_")
            with self.classifier.name_scope():
                if lay.head == "linear":
                    self.classifier.register_child(nn.GlobalMaxPool2D(), "pool")
                    self.classifier.register_child(nn.Dense(self.num_classes, use_bias=False,
                                                            weight_initializer=_dense_init()), "fc")
                    if lay.logit_scale != 1.0:
                        self.classifier.register_child(Scale(lay.logit_scale), "scale")
                else:
                    for name, kind in _CLASSIFIER_LAYERS:
                        if kind == "dropout":
                            layer = nn.Dropout(self.dropout)
                        elif name == "fc3":
                            layer = nn.Dense(self.num_classes, weight_initializer=_output_init())
                        else:
                            # Dense flattens (N, C, H, W) itself and infers C*H*W: no resolution baked in.
                            layer = nn.Dense(self.fc_units, activation="relu", weight_initializer=_dense_init())
                        self.classifier.register_child(layer, name)

    @property
    def stem_conv(self):
        """The patch stem's convolution (None without a stem)."""
        return self.features[0][0] if self.layout.stem else None

    @property
    def min_image_size(self) -> int:
        """Smallest height/width this network accepts: 2 ** pools (+ stem - 1)."""
        return 2 ** len(self.spec) + max(self.layout.stem - 1, 0)

    def forward(self, x, *args):  # noqa: D102 - validates eager inputs, then Gluon's forward
        # Check here rather than in hybrid_forward: a hybridized net only sees symbols there, and
        # MXNet's own error for a too-small or wrong-channel input is a multi-page C++ trace.
        if isinstance(x, mx.nd.NDArray):
            if x.ndim != 4:
                raise ValueError(f"VGG expects a batch of images (N, C, H, W), got shape {x.shape}")
            check_image_size(x.shape[2], x.shape[3], self.min_image_size)
            in_ch = self.in_channels
            if in_ch and x.shape[1] != in_ch:
                raise ValueError(f"this network was built for {in_ch}-channel images, got {x.shape[1]} channels")
        return super().forward(x, *args)

    def hybrid_forward(self, F, x):  # noqa: N803 - Gluon's signature
        """Logits (N, num_classes) for images (N, C, H, W) with H, W >= 32."""
        return self.classifier(self.features(x))

    @property
    def in_channels(self) -> int:
        """Input channels once known (after the first forward or loading), else 0."""
        shape = self.features[0][0].weight.shape  # block1.conv1, or the stem's conv
        return int(shape[1]) if shape and len(shape) > 1 else 0

    def describe(self) -> str:
        """Short human description, e.g. 'vgg11 width 0.25 +BN fc 1024'."""
        bn = " +BN" if self.batch_norm else ""
        if self.layout.head == "linear":
            return f"{self.arch} width {format_width(self.width)}{bn} {self.opts.activation}"
        return f"{self.arch} width {format_width(self.width)}{bn} fc {self.fc_units}"


def build_vgg(arch: str, num_classes: int, *, width: float = 1.0, batch_norm: bool = False,
              fc_units: Optional[int] = None, dropout: float = 0.5, opts: Optional[LayerOptions] = None,
              in_channels: Optional[int] = None) -> VGG:
    """Build a row of VGG_SPECS narrowed by `width`; `fc_units` None -> default_fc_units(width).

    The fast rows (LAYOUTS) get identity-initialized convs unless `opts` says otherwise, and need
    `in_channels` for their patch stem."""
    spec = scaled_spec(arch, width)
    units = default_fc_units(width) if fc_units is None else int(fc_units)
    lay = layout(arch)
    if opts is None:
        opts = LayerOptions(dirac_init=arch in LAYOUTS)
    net = VGG(spec, num_classes, batch_norm=batch_norm, fc_units=units, dropout=dropout,
              arch=arch, width=width, layout=lay, opts=opts, in_channels=in_channels or 3)
    log.debug("built %s: spec %s, %d classes", net.describe(), spec, num_classes)
    return net


def initialize(net: VGG, ctx_list: Sequence[mx.Context], *, seed: Optional[int] = None,
               input_shape: Optional[Tuple[int, int, int]] = None) -> None:
    """Initialize all parameters on every context in `ctx_list` (He-style init, see `_conv_init`).

    Shapes may stay deferred until the first forward pass; the random draws happen then, so for a
    reproducible init either run nothing random in between or pass `input_shape` (C, H, W): a zero
    batch then goes through the net right away and fixes the weights under `seed`.
    Already-initialized parameters are left alone (never wipe loaded weights).
    """
    ctx_list = list(ctx_list)
    if not ctx_list:
        raise ValueError("initialize needs at least one context")
    if seed is not None:
        mx.random.seed(int(seed))
    # The global initializer only covers what the per-layer ones do not: BN gamma/beta/stats and
    # biases (Initializer dispatches on the name suffix: zeros for bias/beta, ones for gamma/var).
    default = mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)
    params = list(net.collect_params().values())
    # Parameters that are already set (e.g. loaded from a checkpoint) are skipped quietly rather
    # than through Gluon's one-warning-per-parameter path.
    pending = [p for p in params if p._data is None and not p._deferred_init]  # noqa: SLF001
    if len(pending) < len(params):
        log.debug("initialize: %d of %d parameters already initialized, left as they are",
                  len(params) - len(pending), len(params))
    for p in pending:
        p.initialize(None, ctx=ctx_list, default_init=default)
    if input_shape is not None:
        materialize(net, ctx_list[0], input_shape)


def materialize(net: VGG, ctx: mx.Context, input_shape: Tuple[int, int, int]) -> None:
    """Run one zero image of `input_shape` (C, H, W) through `net` to finish deferred init.

    Runs outside autograd.record(), i.e. in inference mode: BatchNorm running statistics and
    dropout are untouched.
    """
    c, h, w = input_shape
    check_image_size(h, w, getattr(net, "min_image_size", _MIN_IMAGE_SIZE))
    net(mx.nd.zeros((1, c, h, w), ctx=ctx))
    mx.nd.waitall()
