"""Fast-training techniques (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv 2404.00498, airbench94): patch-whitening initialization, lookahead, flip/translate TTA.

Each is switched on by a RunConfig field and keeps the run's guarantees: the whitening filters
are parameters (saved in model.params), the lookahead state is a checkpoint file of its own
(``lookahead.params``) restored on resume, and TTA changes nothing but the evaluation.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from vgg_gluon.runtime import import_mxnet

log = logging.getLogger(__name__)
mx = import_mxnet()

#: Images the whitening statistics are taken from (airbench94: the first 5,000).
WHITEN_IMAGES = 5000
WHITEN_EPS = 5e-4
LOOKAHEAD_FILE = "lookahead.params"


# ------------------------------------------------------------------------------------------------
# patch whitening
def whitening_filters(images: np.ndarray, k: int = 2, eps: float = WHITEN_EPS) -> np.ndarray:
    """(2*C*k*k, C, k, k) filters from normalized images (N, C, H, W): every eigenvector of the
    k x k patch covariance divided by the square root of its eigenvalue, and its negative (so a
    following ReLU/GELU keeps both signs). Largest eigenvalue first, as airbench94."""
    n, c, h, w = images.shape
    dim = c * k * k
    cov = np.zeros((dim, dim), dtype=np.float64)
    count = 0
    for lo in range(0, n, 500):  # chunks: 5,000 CIFAR images hold 4.8 M patches
        x = images[lo:lo + 500].astype(np.float64)
        # Patch vector order (c, dy, dx) = the conv weight's (in, kh, kw) order.
        cols = [x[:, ci, dy:h - k + 1 + dy, dx:w - k + 1 + dx].reshape(-1)
                for ci in range(c) for dy in range(k) for dx in range(k)]
        p = np.stack(cols)                      # (dim, patches)
        cov += p @ p.T
        count += p.shape[1]
    cov /= max(count, 1)
    evals, evecs = np.linalg.eigh(cov)          # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]
    filt = (evecs.T / np.sqrt(np.maximum(evals, 0.0) + eps)[:, None]).reshape(dim, c, k, k)
    return np.concatenate([filt, -filt]).astype(np.float32)


def whiten_stem(net, train_images_nchw: np.ndarray) -> None:
    """Set the stem conv of `net` to the whitening filters of the images (all devices)."""
    conv = net.stem_conv
    k = net.layout.stem
    filt = whitening_filters(train_images_nchw[:WHITEN_IMAGES], k)
    if tuple(conv.weight.shape) != filt.shape:
        raise ValueError(f"stem weight {conv.weight.shape} does not match the whitening filters {filt.shape}")
    conv.weight.set_data(mx.nd.array(filt))
    log.info("whitened the %dx%d stem from %d images", k, k, min(len(train_images_nchw), WHITEN_IMAGES))


def freeze_stem(net) -> None:
    """The whitening filters stay fixed (airbench94); the stem's bias still trains."""
    net.stem_conv.weight.grad_req = "null"


class StemBiasFreeze:
    """airbench94 trains the whitened stem's bias for its first `epochs` epochs, then freezes it.

    From epoch `epochs` + 1 on, the bias as it was at the start of the epoch is written back after
    every step: exact for every optimizer (MXNet's SGD moves a weight with its momentum even at a
    zero learning rate), on every device, and on resume, where the epoch starts from the
    checkpoint's (already frozen) bias. Changing grad_req instead failed with two CPU contexts."""

    def __init__(self, param, epochs: int) -> None:
        self.param, self.epochs = param, int(epochs)
        self.frozen: Optional[List[mx.nd.NDArray]] = None

    def epoch_start(self, epoch: int) -> None:
        self.frozen = [d.copy() for d in self.param.list_data()] if epoch > self.epochs else None

    def after_step(self, num_update: int = 0) -> None:
        if self.frozen is not None:
            for d, f in zip(self.param.list_data(), self.frozen):
                f.copyto(d)


# ------------------------------------------------------------------------------------------------
# lookahead
class Lookahead:
    """airbench94's lookahead: every `every` steps after `start` of the run, a slow copy of every
    float parameter (BN statistics included) moves towards the network by 1 - rho with
    rho = decay**every * (t / T)**3 (little averaging early, strong at the end), and the network
    is set to it; at each epoch end the network is set to the slow copy once more.

    The slow copy is one array per parameter (devices hold the same weights; BatchNorm statistics
    are averaged over devices when read), written to ``lookahead.params`` with each checkpoint.
    """

    def __init__(self, net, *, every: int, decay: float, start_update: int, total_updates: int,
                 power: float = 3.0) -> None:
        # Structural names ("features.block1.conv1.weight", as in model.params): stable across
        # processes, unlike Gluon's instance prefixes (vgg0_, vgg1_, ...).
        # Trained weights and BatchNorm statistics; fixed parameters (whitening filters, BN gamma
        # without scale) stay out: a lerp of equal values can move them by an ulp.
        named = {n: p for n, p in net._collect_params_with_prefix().items()  # noqa: SLF001 - save_parameters' names
                 if p.grad_req != "null" or n.endswith(("running_mean", "running_var"))}
        self.names, self.params = list(named), list(named.values())
        self.every, self.decay, self.power = int(every), float(decay), float(power)
        self.start_update, self.total_updates = int(start_update), max(int(total_updates), 1)
        self.slow: Optional[List[mx.nd.NDArray]] = None

    def _current(self, p) -> mx.nd.NDArray:
        copies = p.list_data()
        if p.grad_req == "null" and len(copies) > 1:
            first = copies[0].context
            return mx.nd.add_n(*[c.as_in_context(first) for c in copies]) / len(copies)
        return copies[0]

    def _write_back(self) -> None:
        for p, s in zip(self.params, self.slow):
            for d in p.list_data():
                s.copyto(d)

    def after_step(self, num_update: int) -> None:
        """Call after every optimizer step with the optimizer's update count."""
        if num_update < self.start_update or num_update % self.every:
            return
        # The hybridized network (static_alloc) writes the BatchNorm statistics in place, and on a
        # CPU with 2 threads a read here could see them before or after the step's write: two
        # identical --optimizer muon runs ended with running means 2.5e-4 apart (weights equal).
        # Waiting for the step makes the averaged statistics deterministic again.
        mx.nd.waitall()
        if self.slow is None:
            self.slow = [self._current(p).copy() for p in self.params]
            return
        rho = self.decay ** self.every * min(num_update / self.total_updates, 1.0) ** self.power
        for p, s in zip(self.params, self.slow):
            s[:] = s * rho + self._current(p) * (1.0 - rho)
        self._write_back()

    def epoch_end(self) -> None:
        """The network takes the slow weights (before BN statistics are reconciled)."""
        if self.slow is not None:
            mx.nd.waitall()  # the last step's in-place BatchNorm statistics first (see after_step)
            self._write_back()

    def sync_from_net(self) -> None:
        """After the epoch's statistics were averaged (devices, workers): slow copy = network."""
        if self.slow is not None:
            self.slow = [self._current(p).copy() for p in self.params]

    # -- checkpoint ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        arrays: Dict[str, mx.nd.NDArray] = {}
        if self.slow is not None:
            arrays = {n: s.as_in_context(mx.cpu()) for n, s in zip(self.names, self.slow)}
        # An empty file still says "not started yet": mx.nd.save needs one array at least.
        arrays["__started__"] = mx.nd.array([1.0 if self.slow is not None else 0.0])
        mx.nd.save(str(path), arrays)

    def load(self, path: Path) -> None:
        from vgg_gluon.checkpoint import CheckpointError
        try:
            arrays = mx.nd.load(str(path))
        except Exception:  # MXNetError for a damaged file
            raise CheckpointError(f"{path}: cannot read the lookahead state") from None
        if not isinstance(arrays, dict) or "__started__" not in arrays:
            raise CheckpointError(f"{path}: not a lookahead state file")
        if float(arrays["__started__"].asscalar()) == 0.0:
            self.slow = None
            return
        missing = [n for n in self.names if n not in arrays]
        if missing:
            raise CheckpointError(f"{path}: lookahead state lacks {missing[0]} (another network?)")
        ctx = self.params[0].list_data()[0].context
        self.slow = []
        for n, p in zip(self.names, self.params):
            a = arrays[n]
            if a.shape != p.shape:
                raise CheckpointError(f"{path}: lookahead state of {n} has shape {a.shape}, "
                                      f"the network {p.shape}")
            self.slow.append(a.astype(p.dtype).as_in_context(ctx))


# ------------------------------------------------------------------------------------------------
# test-time augmentation
def translate(x: mx.nd.NDArray, dy: int, dx: int) -> mx.nd.NDArray:
    """Shift by (dy, dx) pixels with reflected borders (airbench94's TTA translation uses +-1)."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    h, w = x.shape[2], x.shape[3]
    padded = mx.nd.pad(x, mode="reflect", pad_width=(0, 0, 0, 0, pad, pad, pad, pad))
    y0, x0 = pad - dy, pad - dx
    return padded[:, :, y0:y0 + h, x0:x0 + w]


def tta_logits(net, x: mx.nd.NDArray, mode: str) -> mx.nd.NDArray:
    """Logits of `net` for x under test-time augmentation: none, flip (mean of the image and its
    mirror), or flip-translate (airbench94 level 2: half the flip logits of the image, half the
    mean of those of the image shifted one pixel up-left and down-right)."""
    def mirror(v):
        return 0.5 * net(v) + 0.5 * net(mx.nd.flip(v, axis=3))
    if mode == "none":
        return net(x)
    if mode == "flip":
        return mirror(x)
    if mode == "flip-translate":
        shifted = 0.5 * mirror(translate(x, -1, -1)) + 0.5 * mirror(translate(x, 1, 1))
        return 0.5 * mirror(x) + 0.5 * shifted
    raise ValueError(f"unknown TTA mode {mode!r}")
