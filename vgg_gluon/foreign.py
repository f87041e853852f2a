"""Load `.params` files written by other Gluon VGG scripts into our `VGG`.

Two layouts are understood:

* ``vgg-gluon``: the structural names our own `net.save_parameters` writes
  (``features.block1.conv1.weight`` ...). Loaded strictly by name with `net.load_parameters`.
* ``mapped``: anything else that holds the same tensors in the same network order, e.g. the
  tutorials' ``nn.Sequential`` VGG saved with `save_parameters` (``0.0.weight`` ... ``5.weight`` or
  ``6.weight``, with or without a `Flatten` in between) or with the old `save_params`
  (``sequential0_sequential0_conv0_weight`` ...). Tensors are put in network order, then matched
  to our parameters one by one by shape.

Every failure is a `ParamsError` with one line that names the file and the first thing wrong.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mxnet as mx

from vgg_gluon.errors import UserError, mxnet_error_reason
from vgg_gluon.models import CLASSIC_ARCHS, VGG, VGG_SPECS, format_width, initialize, materialize, scaled_spec

log = logging.getLogger(__name__)

LAYOUT_NATIVE = "vgg-gluon"
LAYOUT_MAPPED = "mapped"

# Order of a layer's tensors as Gluon registers them (Conv2D/Dense: weight, bias; BatchNorm: gamma,
# beta, running_mean, running_var). Files are re-sorted by it so a file whose writer sorted names
# alphabetically (bias < weight) still lines up with our network order.
_SUFFIX_RANK = {
    "weight": 0, "bias": 1, "gamma": 2, "beta": 3,
    "running_mean": 4, "moving_mean": 4, "running_var": 5, "moving_var": 5,
}
_BN_SUFFIXES = {"gamma", "beta", "running_mean", "moving_mean", "running_var", "moving_var"}
_PREFIXED_SUFFIX = re.compile(r"^(?P<layer>.*?)_?(?P<suffix>running_mean|running_var|moving_mean|moving_var"
                              r"|weight|bias|gamma|beta)$")


class ParamsError(UserError):
    """One user-facing line: which file, what is wrong (first mismatch)."""


@dataclass
class LoadReport:
    """What `load_params_any` did: the file, the layout it recognised, how many tensors it loaded."""
    path: str
    layout: str  # "vgg-gluon" | "mapped"
    mapped: int
    message: str


# --- reading ------------------------------------------------------------------------------------

_mx_reason = mxnet_error_reason


def read_params_file(path: Path) -> Dict[str, mx.nd.NDArray]:
    """Named arrays of an MXNet `.params` file, or ParamsError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such file")
    if not path.is_file():
        raise ParamsError(f"{path} is not a readable MXNet .params file (it is a directory)")
    if path.stat().st_size == 0:
        raise ParamsError(f"{path} is not a readable MXNet .params file (the file is empty)")
    try:
        loaded = mx.nd.load(str(path))
    except Exception as exc:  # noqa: BLE001 - MXNetError, OSError, MemoryError...: all mean "bad file"
        raise ParamsError(f"{path} is not a readable MXNet .params file ({_mx_reason(exc)})") from None
    if isinstance(loaded, list):
        if not loaded:
            raise ParamsError(f"{path} is not a readable MXNet .params file (it holds no arrays)")
        raise ParamsError(f"{path} is not a readable MXNet .params file (it holds {len(loaded)} unnamed "
                          "arrays, not named parameters)")
    if not loaded:
        raise ParamsError(f"{path} is not a readable MXNet .params file (it holds no arrays)")
    return loaded


# --- ordering a foreign file --------------------------------------------------------------------

def _strip_kind(name: str) -> str:
    # Symbol-API exports (`HybridBlock.export`) tag names 'arg:' / 'aux:'.
    return name[4:] if name.startswith(("arg:", "aux:")) else name


def _split(name: str) -> Tuple[Tuple[str, ...], str]:
    """(layer path, tensor suffix) of a parameter name, dotted or prefixed."""
    name = _strip_kind(name)
    if "." in name:
        *layer, suffix = name.split(".")
        return tuple(layer), suffix
    m = _PREFIXED_SUFFIX.match(name)
    if m:
        return (m.group("layer"),), m.group("suffix")
    return (name,), ""


def network_order(names: Sequence[str]) -> List[str]:
    """`names` (file order) rearranged into the order of the network that wrote them.

    Dotted structural names (``0.0.weight``, ``10.bias``) are sorted as a tree: siblings that are
    all integers sort numerically (so ``10`` follows ``9``, which a string sort gets wrong), named
    siblings keep the order in which they first appear. Prefixed names (``sequential0_conv0_weight``)
    cannot be sorted (``dense0`` would precede ``sequential0``): they keep the file order, which
    `mx.nd.save` preserves and Gluon writes in registration order. In both cases a layer's tensors
    are grouped and put in Gluon's order (weight, bias, gamma, beta, running mean, running var), which
    also re-attaches `aux:` BN statistics that exports store after all other tensors.
    """
    position = {name: i for i, name in enumerate(names)}
    first_seen: Dict[Tuple[str, ...], int] = {}
    for i, name in enumerate(names):
        layer, _ = _split(name)
        for depth in range(1, len(layer) + 1):
            first_seen.setdefault(layer[:depth], i)

    # Per tree level: numeric order if every sibling is an integer, else first appearance.
    siblings: Dict[Tuple[str, ...], List[str]] = {}
    for path in first_seen:
        siblings.setdefault(path[:-1], []).append(path[-1])
    numeric = {parent: all(k.isdigit() for k in keys) for parent, keys in siblings.items()}

    def key(name: str):
        layer, suffix = _split(name)
        parts = []
        for depth in range(1, len(layer) + 1):
            parent, part = layer[:depth - 1], layer[depth - 1]
            parts.append(int(part) if numeric[parent] else first_seen[layer[:depth]])
        return (tuple(parts), _SUFFIX_RANK.get(suffix, len(_SUFFIX_RANK)), position[name])

    return sorted(names, key=key)


# --- describing mismatches ----------------------------------------------------------------------

def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")" if len(shape) != 1 else f"({int(shape[0])},)"


def _net_label(net: VGG) -> str:
    return f"{net.arch} width {format_width(net.width)}" + (" with batch norm" if net.batch_norm else "")


def _expected_count(num_convs: int, batch_norm: bool) -> int:
    # Our layout: conv weight+bias, or conv weight + BN (gamma, beta, mean, var); 3 dense w+b.
    return num_convs * (5 if batch_norm else 2) + 6


def _count_hint(net: VGG, count: int, file_has_bn: bool) -> str:
    if net.batch_norm and not file_has_bn:
        return "the network uses batch norm but the file has no batch-norm tensors: use --no-batch-norm"
    if file_has_bn and not net.batch_norm:
        return "the file has batch-norm tensors but the network has none: use --batch-norm"
    for arch, spec in ((a, VGG_SPECS[a]) for a in CLASSIC_ARCHS):  # the tutorial layouts' rows
        if arch != net.arch and _expected_count(sum(n for n, _ in spec), net.batch_norm) == count:
            return f"the file looks like {arch}: use --arch {arch}"
    return "the file is not a VGG of this family"


def _shape_hint(net: VGG, our_name: str, file_shape: Tuple[int, ...], net_shape: Tuple[int, ...],
                input_shape: Tuple[int, int, int]) -> str:
    """Best guess at which setting differs, for the first mismatching tensor."""
    parts = our_name.split(".")
    m = re.fullmatch(r"block(\d+)", parts[1]) if parts[0] == "features" else None
    if m:
        block = int(m.group(1))
        first_conv = our_name == "features.block1.conv1.weight"
        if first_conv and len(file_shape) == 4 and file_shape[0] == net_shape[0] and file_shape[1] != net_shape[1]:
            return (f"the file was trained on {file_shape[1]}-channel images but the data has "
                    f"{net_shape[1]} channel(s): use the data set it was trained on")
        if net.arch in VGG_SPECS and file_shape and file_shape[0] != net_shape[0]:
            base = VGG_SPECS[net.arch][block - 1][1]
            width = format_width(file_shape[0] / base)
            return f"the file looks like width {width}: use --width {width}"
        return "the file was written by a different architecture or width"
    layer = parts[1] if len(parts) > 1 else ""
    if layer == "fc3" and file_shape and file_shape[0] != net_shape[0]:
        return f"the file has {file_shape[0]} classes, the network {net_shape[0]}"
    if layer in ("fc1", "fc2") and file_shape and file_shape[0] != net_shape[0]:
        return f"the file has {file_shape[0]} units per hidden dense layer: use --fc-units {file_shape[0]}"
    if layer == "fc1" and len(file_shape) == 2 and file_shape[1] != net_shape[1]:
        channels = net.spec[-1][1]
        _, h, w = input_shape
        area, rem = divmod(int(file_shape[1]), channels)
        side = math.isqrt(area) if area > 0 else 0
        if rem == 0 and side * side == area:
            return (f"the file's first dense layer takes {channels}x{side}x{side} features, this input "
                    f"gives {channels}x{h // 32}x{w // 32}: it was trained on images of about {32 * side} px: "
                    f"use --image-size {32 * side}")
        return "the file was trained on another input size"
    return "the file was written by a different network"


# --- loading ------------------------------------------------------------------------------------

def _prepare(net: VGG, ctx_list: List[mx.Context], input_shape: Tuple[int, int, int], path: Path) -> None:
    """Make every parameter of `net` exist with a known shape on `ctx_list`."""
    params = net.collect_params()
    try:
        for p in params.values():
            p.list_ctx()
    except RuntimeError:
        # Never initialized: give it an init so the shapes can be inferred; every tensor is
        # overwritten below (a partial load is refused), so the random values never survive.
        initialize(net, ctx_list)
    current = set(next(iter(params.values())).list_ctx())
    if current != set(ctx_list):
        params.reset_ctx(ctx_list)
    if any(not p.shape or 0 in p.shape for p in params.values()):
        try:
            materialize(net, ctx_list[0], input_shape)
        except (ValueError, mx.base.MXNetError) as exc:
            raise ParamsError(f"{path}: cannot infer the network's shapes for input {tuple(input_shape)} "
                              f"({_mx_reason(exc)})") from None


def _fold_conv_bias_into_bn(entries: List[Tuple[str, mx.nd.NDArray]]
                            ) -> Tuple[List[Tuple[str, mx.nd.NDArray]], int]:
    """Drop conv biases that feed a BatchNorm, moving them into its running mean.

    gluoncv's VGG-BN (and many scripts) keep a bias on convs followed by BN; ours has none. The fold
    is exact: BN(x + b) normalizes with the batch mean in training (b cancels) and with
    (x + b - running_mean) at inference, i.e. (x - (running_mean - b)).
    """
    out: List[Tuple[str, mx.nd.NDArray]] = []
    folded, i = 0, 0
    while i < len(entries):
        name, arr = entries[i]
        nxt = [_split(n)[1] for n, _ in entries[i + 1:i + 4]]
        if (_split(name)[1] == "bias" and arr.ndim == 1 and out and out[-1][1].ndim == 4
                and nxt[:2] == ["gamma", "beta"] and len(nxt) == 3 and nxt[2] in ("running_mean", "moving_mean")
                and entries[i + 3][1].shape == arr.shape):
            mean_name, mean = entries[i + 3]
            out.extend(entries[i + 1:i + 3])
            out.append((mean_name, mean - arr))
            folded += 1
            i += 4
            continue
        out.append((name, arr))
        i += 1
    return out, folded


# Longer than 60 lines on purpose: one pass that reads, recognises the layout, checks every shape
# in order and names the first mismatch; split, the order of the checks would be spread out.
def load_params_any(net: VGG, path: Path, ctx_list: Sequence[mx.Context], *,
                    input_shape: Tuple[int, int, int]) -> LoadReport:
    """Load `path` into `net` on every context of `ctx_list`, from our layout or a tutorial's.

    `input_shape` (C, H, W) is the image shape the network will see; it fixes the shapes that
    deferred initialization leaves open (input channels, first dense layer's input size).
    """
    path = Path(path)
    ctx_list = list(ctx_list)
    loaded = read_params_file(path)
    ours = net._collect_params_with_prefix()  # noqa: SLF001 - the names save_parameters writes
    file_names = list(loaded)
    native = set(file_names) == set(ours)
    file_has_bn = any(_split(n)[1] in _BN_SUFFIXES for n in file_names)

    # Cheap checks on names and counts first: no init or forward pass for a file we will refuse.
    if not native and all(n.startswith(("features.block", "classifier.fc")) for n in file_names):
        # Our own layout, but another arch / BN setting: order mapping would only mislead.
        missing = [n for n in ours if n not in loaded]
        extra = [n for n in file_names if n not in ours]
        first = f"'{missing[0]}' is missing" if missing else f"'{extra[0]}' is unexpected"
        raise ParamsError(f"{path}: vgg-gluon file for another network ({len(file_names)} tensors, "
                          f"{_net_label(net)} has {len(ours)}; {first}); "
                          f"{_count_hint(net, len(file_names), file_has_bn)}")
    entries: List[Tuple[str, mx.nd.NDArray]] = []
    folded = 0
    if not native:
        entries = [(n, loaded[n]) for n in network_order(file_names)]
        if net.batch_norm:
            entries, folded = _fold_conv_bias_into_bn(entries)
        if len(entries) != len(ours):
            raise ParamsError(f"{path}: holds {len(file_names)} tensors but {_net_label(net)} has {len(ours)}; "
                              f"{_count_hint(net, len(file_names), file_has_bn)}")

    _prepare(net, ctx_list, input_shape, path)

    if native:
        for name, param in ours.items():
            if tuple(loaded[name].shape) != tuple(param.shape):
                hint = _shape_hint(net, name, loaded[name].shape, param.shape, input_shape)
                raise ParamsError(f"{path}: parameter '{name}' has shape {_shape(loaded[name].shape)} in the "
                                  f"file but {_net_label(net)} expects {_shape(param.shape)}; {hint}")
        try:
            net.load_parameters(str(path), ctx=ctx_list, cast_dtype=True, dtype_source="current")
        except (AssertionError, RuntimeError, ValueError, mx.base.MXNetError) as exc:
            raise ParamsError(f"{path}: cannot load ({_mx_reason(exc)})") from None
        msg = f"loaded {len(ours)} tensors from {path} (vgg-gluon layout)"
        log.info(msg)
        return LoadReport(str(path), LAYOUT_NATIVE, len(ours), msg)

    targets = list(ours.items())
    for i, ((fname, arr), (oname, param)) in enumerate(zip(entries, targets), start=1):
        fshape, nshape = tuple(arr.shape), tuple(param.shape)
        if fshape != nshape:
            hint = _shape_hint(net, oname, fshape, nshape, input_shape)
            raise ParamsError(f"{path}: tensor {i} '{fname}' has shape {_shape(fshape)} but {_net_label(net)} "
                              f"expects {_shape(nshape)} at {oname}; {hint}")
    # Everything matched: only now touch the network, so a refused file leaves it as it was.
    for (_, arr), (_, param) in zip(entries, targets):
        param.set_data(arr.astype(param.dtype, copy=False))  # copies to every context
    style = "structural names" if "." in file_names[0] else "prefixed names"
    msg = (f"mapped {len(targets)} tensors from a tutorial-style layout ({style} such as '{entries[0][0]}') "
           f"in {path} onto {_net_label(net)}")
    if folded:
        msg += f" ({folded} conv biases folded into the batch-norm running means)"
    log.info(msg)
    return LoadReport(str(path), LAYOUT_MAPPED, len(targets), msg)


# --- guessing the architecture of a file --------------------------------------------------------

def _width_for(arch: str, channels: List[int]) -> Optional[float]:
    """A width multiplier whose `scaled_spec(arch, width)` reproduces the conv channel counts."""
    wanted = [c for n, c in _spec_from_channels(arch, channels) or ()]
    if not wanted:
        return None
    base = VGG_SPECS[arch]
    # int(c * width) truncates, so try the ratio of every block (the widest block is the most exact).
    for b in reversed(range(len(base))):
        for width in (wanted[b] / base[b][1], round(wanted[b] / base[b][1], 4)):
            if [c for _, c in scaled_spec(arch, width)] == wanted:
                return width
    return None


def _spec_from_channels(arch: str, channels: List[int]) -> Optional[Tuple[Tuple[int, int], ...]]:
    """Group a file's conv output channels into `arch`'s blocks, if they fit its pattern."""
    spec, i = [], 0
    for num_convs, _ in VGG_SPECS[arch]:
        block = channels[i:i + num_convs]
        if len(block) != num_convs or len(set(block)) != 1:
            return None
        spec.append((num_convs, block[0]))
        i += num_convs
    return tuple(spec) if i == len(channels) else None


def infer_architecture(path: Path) -> Dict[str, Any]:
    """Guess arch, width, batch_norm, fc_units, num_classes and in_channels from a file's shapes.

    Works for our layout and the tutorial layouts alike (tensors are read in network order). Only
    what could be determined is returned (an empty dict for a file that is not a VGG); unreadable
    files raise ParamsError. A guess is not a check: `load_params_any` still verifies every shape.
    """
    loaded = read_params_file(Path(path))
    ordered = network_order(list(loaded))
    shapes = [tuple(loaded[n].shape) for n in ordered]
    suffixes = [_split(n)[1] for n in ordered]
    convs = [s for s, suf in zip(shapes, suffixes) if len(s) == 4 and suf == "weight"]
    denses = [s for s, suf in zip(shapes, suffixes) if len(s) == 2 and suf == "weight"]
    out: Dict[str, Any] = {}
    if not convs or len(denses) != 3:
        return out
    out["batch_norm"] = any(suf in _BN_SUFFIXES for suf in suffixes)
    out["in_channels"] = int(convs[0][1])
    out["fc_units"] = int(denses[0][0])
    out["num_classes"] = int(denses[-1][0])
    channels = [int(s[0]) for s in convs]
    for arch in CLASSIC_ARCHS:  # the fast rows have no tutorial layout to recognize
        if _spec_from_channels(arch, channels) is not None:
            out["arch"] = arch
            width = _width_for(arch, channels)
            if width is not None:
                out["width"] = width
            break
    log.debug("inferred from %s: %s", path, out)
    return out
