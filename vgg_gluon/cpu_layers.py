"""Layers that steer oneDNN (MXNet's CPU kernels) onto its fast paths on AVX-512 CPUs.

oneDNN's AVX-512 convolutions work on 16-channel blocks. A conv whose input or output count is not
a multiple of 16 (the whitened stem's 24 filters, or 8 for one-channel images) falls back to AVX2
kernels with 8-channel blocks, and the layers around it then meet two blockings. Both layers here
compute what the plain Gluon layer computes (exactly, or up to the order of a float sum), with the
same parameter names and shapes, so checkpoints move freely between machines that use them and
machines that do not. Measurements: benchmarks/README.md ("Third session", "Fourth session").
"""
from typing import Optional

from mxnet.gluon import nn

from . import _env

#: oneDNN's AVX-512 channel block.
BLOCK = 16


def channel_padding(channels: Optional[int]) -> int:
    """Zero channels that bring `channels` to a multiple of BLOCK on AVX-512 oneDNN, else 0.

    1 to 4 channels (an image) are left alone: oneDNN has a dedicated first-layer kernel for those."""
    if not channels or channels <= 4 or channels % BLOCK == 0 or not _env.onednn_uses_avx512():
        return 0
    return BLOCK - channels % BLOCK


def needs_relayout(in_channels: Optional[int]) -> bool:
    """Whether the BatchNorm after a conv with `in_channels` inputs needs `RelayoutBatchNorm`."""
    return channel_padding(in_channels) > 0


class RelayoutBatchNorm(nn.BatchNorm):
    """BatchNorm that first passes its input through `x * 1.0` (exact), which hands it to oneDNN
    in the plain NCHW layout.

    Why: on an AVX-512 CPU, a conv whose input channels are not a multiple of 16 runs an AVX2
    kernel that writes 8-channel blocks, while the rest of the net uses 16-channel blocks. The
    BatchNorm after it then got its data in one blocking and its gradient in the other, and oneDNN
    2.x fell back to its reference kernel: 142 of 481 ms per step of the CIFAR-10 default (fast3
    x0.5, batch 512). Through the plain layout it runs a JIT kernel: 349 ms per step. Same
    parameter names as nn.BatchNorm (same alias)."""

    def _alias(self) -> str:
        return "batchnorm"

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):  # noqa: N803
        return super().hybrid_forward(F, x * 1.0, gamma, beta, running_mean, running_var)


def _zero_extend(F, w, axis: int, extra: int):  # noqa: N803 - Gluon's F
    """`w` with `extra` zero slices appended along `axis` (works on NDArrays and Symbols)."""
    zero = F.zeros_like(F.slice_axis(w, axis=axis, begin=0, end=1))
    return F.concat(w, F.repeat(zero, repeats=extra, axis=axis), dim=axis)


class ZeroPaddedConv2D(nn.Conv2D):
    """nn.Conv2D that runs as if it had `pad_out` more filters and `pad_in` more input channels,
    all with zero weights (and zero bias): its parameters keep their shapes and names, only the
    kernel oneDNN picks changes.

    The padded output channels are exactly zero, so an elementwise layer after it keeps them zero
    (ReLU(0) = GELU(0) = 0), and the next conv, built with the same number as `pad_in`, reads them
    against zero weights. The pair computes what the unpadded pair computes, up to the order of
    the float sums. `in_channels` must be given (the padding needs the weight's shape up front).
    """

    def __init__(self, channels: int, *, in_channels: int, pad_out: int = 0, pad_in: int = 0, **kwargs) -> None:
        if in_channels < 1:
            raise ValueError("ZeroPaddedConv2D needs in_channels")
        super().__init__(channels, in_channels=in_channels, **kwargs)
        self.pad_out, self.pad_in = int(pad_out), int(pad_in)
        if self.pad_out:
            self._kwargs = dict(self._kwargs, num_filter=channels + self.pad_out)

    def _alias(self) -> str:
        return "conv"

    def hybrid_forward(self, F, x, weight, bias=None):  # noqa: N803 - Gluon's signature
        if self.pad_in:
            weight = _zero_extend(F, weight, 1, self.pad_in)
        if self.pad_out:
            weight = _zero_extend(F, weight, 0, self.pad_out)
            if bias is not None:
                bias = _zero_extend(F, bias, 0, self.pad_out)
        return super().hybrid_forward(F, x, weight, bias)
