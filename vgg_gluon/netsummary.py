"""The analytic description of a VGG network: one row per layer or block with its output shape,
trainable parameters and multiply-adds, computed from the configuration (the tests check it
against real forward passes); the table `vgg-gluon summary` prints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from vgg_gluon.models import (
    _CLASSIFIER_LAYERS,
    VGG,
    Layout,
    Spec,
    _block_layer_names,
    check_image_size,
    default_fc_units,
    layout,
    scaled_spec,
    stem_channels,
)

# --- analytic description -----------------------------------------------------------------------

@dataclass
class LayerRow:
    """One row of a layer table: output shape for batch 1, trainable parameters, multiply-accumulates."""
    name: str
    kind: str
    output_shape: Tuple[int, ...]
    params: int
    macs: int


def _spec_rows(spec: Spec, batch_norm: bool, fc_units: int, num_classes: int,
               input_shape: Tuple[int, int, int], lay: Layout = Layout()) -> List[LayerRow]:
    """Per-layer rows computed from the configuration alone (no network, no forward pass).

    Counting conventions: `params` are trainable parameters only (BN's running mean/var are state,
    not trained); `macs` count conv and dense multiply-accumulates, plus one per output element for
    BN (scale-and-shift at inference); ReLU, max-pool and dropout do no multiplies. Bias adds are
    not counted, as usual.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape is (channels, height, width), got {input_shape}")
    c, h, w = (int(v) for v in input_shape)
    check_image_size(h, w, 2 ** len(spec) + max(lay.stem - 1, 0))
    rows: List[LayerRow] = []
    if lay.stem:
        k, out = lay.stem, stem_channels(lay, c)
        h, w = h - k + 1, w - k + 1
        rows.append(LayerRow("features.stem.conv", "conv", (1, out, h, w), out * c * k * k + out,
                             out * h * w * c * k * k))
        c = out
        rows.append(LayerRow("features.stem.act", "relu", (1, c, h, w), 0, 0))
    for b, (num_convs, channels) in enumerate(spec, start=1):
        for name, kind in _block_layer_names(num_convs, batch_norm, lay.pool):
            full = f"features.block{b}.{name}"
            if kind == "conv":
                params = channels * c * 9 + (0 if batch_norm else channels)
                macs = channels * h * w * c * 9
                c = channels
                rows.append(LayerRow(full, kind, (1, c, h, w), params, macs))
            elif kind == "bn":
                rows.append(LayerRow(full, kind, (1, c, h, w), 2 * c, c * h * w))
            elif kind == "relu":
                rows.append(LayerRow(full, kind, (1, c, h, w), 0, 0))
            else:  # pool: 2x2 stride 2, no padding -> floor halving
                h, w = h // 2, w // 2
                rows.append(LayerRow(full, kind, (1, c, h, w), 0, 0))
    if lay.head == "linear":
        rows.append(LayerRow("classifier.pool", "pool", (1, c, 1, 1), 0, 0))
        rows.append(LayerRow("classifier.fc", "dense", (1, num_classes), c * num_classes, c * num_classes))
        if lay.logit_scale != 1.0:
            rows.append(LayerRow("classifier.scale", "scale", (1, num_classes), 0, 0))
        return rows
    features = c * h * w
    for name, kind in _CLASSIFIER_LAYERS:
        full = f"classifier.{name}"
        if kind == "dropout":
            rows.append(LayerRow(full, kind, (1, features), 0, 0))
            continue
        units = num_classes if name == "fc3" else fc_units
        rows.append(LayerRow(full, kind, (1, units), features * units + units, features * units))
        features = units
    return rows


def layer_summary(net: VGG, input_shape: Tuple[int, int, int]) -> List[LayerRow]:
    """One row per layer (conv, bn, relu, pool, dense, dropout) for images of `input_shape` (C, H, W)."""
    return _spec_rows(net.spec, net.batch_norm, net.fc_units, net.num_classes, input_shape, net.layout)


def block_summary(net: VGG, input_shape: Tuple[int, int, int]) -> List[LayerRow]:
    """One row per VGG block (kind 'block', totals) followed by one row per classifier layer.

    For vgg11 at 224 px this is the table the tutorials print by hand: (1,64,112,112) ...
    (1,512,7,7), then dense (1,4096), dropout, dense (1,4096), dropout, dense (1,num_classes).
    """
    rows: List[LayerRow] = []
    for row in layer_summary(net, input_shape):
        if not row.name.startswith("features."):
            rows.append(row)
            continue
        block = row.name.rsplit(".", 1)[0]
        if rows and rows[-1].name == block:
            last = rows[-1]
            rows[-1] = LayerRow(block, "block", row.output_shape, last.params + row.params, last.macs + row.macs)
        else:
            rows.append(LayerRow(block, "block", row.output_shape, row.params, row.macs))
    return rows


def count_params(rows: Iterable[LayerRow]) -> int:
    """Total trainable parameters of a summary."""
    return sum(r.params for r in rows)


def count_macs(arch: str, width: float, batch_norm: bool, fc_units: Optional[int], num_classes: int,
               input_shape: Tuple[int, int, int]) -> int:
    """Forward multiply-accumulates per image (conventions as in `layer_summary`); FLOPs ~ 2 x MACs."""
    units = default_fc_units(width) if fc_units is None else int(fc_units)
    rows = _spec_rows(scaled_spec(arch, width), batch_norm, units, num_classes, input_shape, layout(arch))
    return sum(r.macs for r in rows)


def format_summary(rows: Sequence[LayerRow]) -> str:
    """Plain-text table of summary rows (for the CLI to print)."""
    lines = [f"{'layer':<26} {'kind':<8} {'output shape':<22} {'params':>12} {'MACs':>15}"]
    for r in rows:
        shape = "(" + ", ".join(str(v) for v in r.output_shape) + ")"
        lines.append(f"{r.name:<26} {r.kind:<8} {shape:<22} {r.params:>12,} {r.macs:>15,}")
    lines.append(f"{'total':<26} {'':<8} {'':<22} {sum(r.params for r in rows):>12,} "
                 f"{sum(r.macs for r in rows):>15,}")
    return "\n".join(lines)
