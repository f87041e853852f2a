"""Batches for MXNet: `transform_batch` turns a uint8 NHWC batch into a normalized float32 NCHW
batch with NDArray ops on the batch's own device; `BatchLoader` holds a split once as an NDArray
and yields deterministic, resumable, optionally sharded batches.

MXNet is imported inside the functions: `runtime` must set the thread count before the first
`import mxnet`, and `vgg-gluon data` should not pay MXNet's import time at all."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from vgg_gluon.data.base import DataError, Split

if TYPE_CHECKING:  # pragma: no cover - hints only
    import mxnet as mx

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Batches (MXNet)


_CONSTS: Dict[Tuple[Tuple[float, ...], Tuple[float, ...], str], Tuple["mx.nd.NDArray", "mx.nd.NDArray"]] = {}


def _channel_consts(mean: Sequence[float], std: Sequence[float],
                    ctx: "mx.Context") -> Tuple["mx.nd.NDArray", "mx.nd.NDArray"]:
    """(mean, 1/std) as (1, C, 1, 1) NDArrays on ctx, made once per (mean, std, ctx)."""
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), str(ctx))
    if key not in _CONSTS:
        c = len(mean)
        _CONSTS[key] = (_nd_on(np.asarray(key[0], dtype=np.float32).reshape(1, c, 1, 1), ctx),
                        _nd_on((1.0 / np.asarray(key[1], dtype=np.float32)).reshape(1, c, 1, 1), ctx))
    return _CONSTS[key]


def _nd_on(a: np.ndarray, ctx: "mx.Context", dtype: str = "float32") -> "mx.nd.NDArray":
    """numpy -> NDArray on ctx: a host copy, then an asynchronous engine copy to the device
    (mx.nd.array(ctx=gpu) would be a blocking host-to-device copy in the batch loop)."""
    import mxnet as mx

    return mx.nd.array(a, ctx=mx.cpu(), dtype=dtype).as_in_context(ctx)


def _zero_pad(y: "mx.nd.NDArray", top: int, bottom: int, left: int, right: int) -> "mx.nd.NDArray":
    """Zero-pad the last two axes of (B, C, H, W): a zero array and one slice assignment.

    Same result as mx.nd.pad(mode="constant"), whose CPU kernel is ~15x slower here (5.1 vs
    0.3 ms for 128 x 1 x 28 x 28 -> 32 x 32), which made the padding most of the batch pipeline.
    """
    import mxnet as mx

    b, c, h, w = y.shape
    out = mx.nd.zeros((b, c, h + top + bottom, w + left + right), ctx=y.context, dtype=y.dtype)
    out[:, :, top:top + h, left:left + w] = y
    return out


def _reflect(k: np.ndarray, n: int) -> np.ndarray:
    """Index k in [-(n-1), 2n-2] of a border-reflected axis of length n -> its source index."""
    k = np.abs(k)
    return np.where(k > n - 1, 2 * (n - 1) - k, k)


def _crop_flip(y: "mx.nd.NDArray", p: int, offsets: np.ndarray, flips: np.ndarray,
               pad_mode: str = "zero") -> "mx.nd.NDArray":
    """Per-sample crop of y padded by p (zeros, or the reflected border) at offsets (B, 2), then
    flip where flips (B,).

    Two gathers with mx.nd.take over computed indices (rows, then columns; the flip is just
    reversed column indices), so it costs the same for any mix of offsets and flips, with
    index arrays of only B*H and B*W entries. A reflected border is in the indices too: no
    padded copy is made.
    """
    import mxnet as mx

    ctx = y.context
    b, c, h, w = y.shape
    reflect = bool(p) and pad_mode == "reflect"
    if p:
        if reflect:
            hp, wp, src = h, w, _reflect(offsets[:, :1] - p + np.arange(h)[None, :], h)
        else:
            y = _zero_pad(y, p, p, p, p)
            hp, wp, src = h + 2 * p, w + 2 * p, offsets[:, :1] + np.arange(h)[None, :]
        # Rows: (B, C, Hp, Wp) -> (B, Hp, C, Wp) -> (B*Hp, C*Wp); output row i of sample b is
        # row b*Hp + src[b, i].
        rows = (np.arange(b)[:, None] * hp + src).ravel()
        y = mx.nd.take(mx.nd.transpose(y, axes=(0, 2, 1, 3)).reshape((b * hp, c * wp)),
                       _nd_on(rows, ctx, "int32"))
        y = mx.nd.transpose(y.reshape((b, h, c, wp)), axes=(0, 2, 1, 3))  # (B, C, H, Wp)
    else:
        wp = w
    # Columns: (B, C, H, Wp) -> (B, Wp, C, H) -> (B*Wp, C*H); output column j of sample b is
    # padded column dx_b + j, or dx_b + W-1-j when it is flipped.
    j = np.arange(w)[None, :]
    src = offsets[:, 1:] + np.where(flips[:, None], w - 1 - j, j)
    if reflect:
        src = _reflect(src - p, w)
    cols = (np.arange(b)[:, None] * wp + src).ravel()
    y = mx.nd.take(mx.nd.transpose(y, axes=(0, 3, 1, 2)).reshape((b * wp, c * h)),
                   _nd_on(cols, ctx, "int32"))
    return mx.nd.transpose(y.reshape((b, w, c, h)), axes=(0, 2, 3, 1))  # (B, C, H, W)


def transform_batch(x: "mx.nd.NDArray", *, mean: Sequence[float], std: Sequence[float],
                    pad_to: Optional[int], image_size: Optional[int], crop_pad: int = 0,
                    crop_offsets: Optional[np.ndarray] = None,
                    flips: Optional[np.ndarray] = None, cutout: int = 0,
                    cutout_centers: Optional[np.ndarray] = None, pad_mode: str = "zero") -> "mx.nd.NDArray":
    """uint8 (B, H, W, C) -> normalized float32 (B, C, H', W') on x's context.

    Semantics, in order: float NCHW -> zero-pad to pad_to (or, if image_size is given,
    bilinear resize straight from the source size, no padding) -> crop of the image
    padded by crop_pad (zeros, or reflected with pad_mode "reflect") at per-sample offsets
    (B, 2) in [0, 2*crop_pad] -> horizontal flip where flips[b] -> (x - mean) / std. A handful
    of NDArray ops over the whole batch, no Python loop per sample.

    When resizing without a crop, the flip and the normalization are applied to the small
    source image instead (same result: the resize's sampling grid is mirror-symmetric and its
    weights sum to 1), which makes 32 -> 224 several times cheaper. With a crop after the
    resize the literal order is kept: the crop's zero padding is black in pixel units.
    """
    import mxnet as mx

    b, h, w, _ = x.shape
    do_crop = bool(crop_pad) and crop_offsets is not None
    flip_mask = np.zeros(b, dtype=bool) if flips is None else np.asarray(flips, dtype=bool).reshape(b)
    if do_crop:
        offsets = np.asarray(crop_offsets, dtype=np.int64).reshape(b, 2)
        if offsets.min() < 0 or offsets.max() > 2 * crop_pad:
            raise ValueError(f"crop offsets must be in [0, {2 * crop_pad}]")
    zero_offsets = np.zeros((b, 2), dtype=np.int64)
    m, inv = _channel_consts(mean, std, x.context)

    y = mx.nd.transpose(x.astype("float32"), axes=(0, 3, 1, 2))
    if image_size and (h, w) != (image_size, image_size):
        size = int(image_size)
        if do_crop:  # literal order: the crop's padding must be black, and it precedes the flip
            y = mx.nd.contrib.BilinearResize2D(y, height=size, width=size)
            return mx.nd.broadcast_mul(mx.nd.broadcast_sub(_crop_flip(y, int(crop_pad), offsets, flip_mask, pad_mode),
                                                           m), inv)
        if flip_mask.any():
            y = _crop_flip(y, 0, zero_offsets, flip_mask)
        y = mx.nd.broadcast_mul(mx.nd.broadcast_sub(y, m), inv)
        return mx.nd.contrib.BilinearResize2D(y, height=size, width=size)
    if not image_size and pad_to and (h < pad_to or w < pad_to):
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        y = _zero_pad(y, top, max(pad_to - h, 0) - top, left, max(pad_to - w, 0) - left)
    if do_crop or flip_mask.any():
        y = _crop_flip(y, int(crop_pad) if do_crop else 0, offsets if do_crop else zero_offsets, flip_mask, pad_mode)
    y = mx.nd.broadcast_mul(mx.nd.broadcast_sub(y, m), inv)
    if cutout and cutout_centers is not None:
        y = mx.nd.broadcast_mul(y, _nd_on(cutout_mask(y.shape[2], y.shape[3], cutout, cutout_centers), y.context))
    return y


def cutout_mask(h: int, w: int, size: int, centers: np.ndarray) -> np.ndarray:
    """(B, 1, H, W) float mask, 0 inside a size x size square at each (cy, cx), clipped at the
    border (DeVries & Taylor 2017; on normalized images, i.e. the data set's mean colour)."""
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, 2)
    lo = size // 2
    rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
    in_r = (rows >= centers[:, :1] - lo) & (rows < centers[:, :1] - lo + size)   # (B, H)
    in_c = (cols >= centers[:, 1:] - lo) & (cols < centers[:, 1:] - lo + size)   # (B, W)
    return (~(in_r[:, :, None] & in_c[:, None, :]))[:, None].astype(np.float32)


class BatchLoader:
    """Deterministic, resumable, shardable batches of one split, split across devices.

    The split lives once as a uint8 NDArray on mx.cpu(); each batch is gathered there per
    device, copied to the device as uint8 (4x less traffic than float32) and transformed
    there. All randomness of epoch e comes from np.random.default_rng([seed, epoch]) and is
    drawn for the whole epoch up front, so an epoch replays identically and start_batch can
    skip batches without computing them.
    """

    def __init__(self, split: Split, batch_size: int, ctx_list: List["mx.Context"], *,
                 mean: Sequence[float], std: Sequence[float], pad_to: Optional[int],
                 image_size: Optional[int], train: bool, augment_crop_pad: int = 0,
                 augment_flip: bool = False, seed: int = 0, shard: Tuple[int, int] = (0, 1),
                 alternate_flip: bool = False, augment_cutout: int = 0, augment_pad: str = "zero") -> None:
        import mxnet as mx

        if not ctx_list:
            raise DataError("no device context given")
        if batch_size < len(ctx_list):
            raise DataError(f"batch size {batch_size} is smaller than the number of devices "
                            f"({len(ctx_list)}): each device needs at least one sample")
        rank, workers = shard
        if not (workers >= 1 and 0 <= rank < workers):
            raise DataError(f"invalid shard {shard}: need 0 <= rank < num_workers")
        self.batch_size = int(batch_size)
        self.ctx_list = list(ctx_list)
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad_to, self.image_size = pad_to, image_size
        self.train = bool(train)
        self.crop_pad = int(augment_crop_pad) if train else 0
        self.pad_mode = augment_pad
        self.flip = bool(augment_flip) and train
        self.alternate_flip = bool(alternate_flip) and self.flip
        self.cutout = int(augment_cutout) if train else 0
        self.seed = int(seed)
        self.rank, self.workers = int(rank), int(workers)
        self._n = len(split)
        self._images = mx.nd.array(split.images, ctx=mx.cpu(), dtype=np.uint8)
        self._labels = mx.nd.array(split.labels, ctx=mx.cpu(), dtype=np.float32)
        if self.train:
            # Every worker gets the same number of full batches, or dist_sync would hang.
            self._per_worker = (self._n // self.workers) // self.batch_size * self.batch_size
            if self._per_worker == 0:
                raise DataError(f"{self._n} training images are fewer than one batch of "
                                f"{self.batch_size} x {self.workers} worker(s): lower the batch size")
        else:
            # Evaluation keeps everything; workers may then differ by one sample.
            self._per_worker = len(range(self.rank, self._n, self.workers))

    def __len__(self) -> int:
        return (self._per_worker + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        """Samples per epoch actually yielded (by this worker)."""
        return self._per_worker

    def _plan(self, epoch: int):
        """This worker's sample indices for the epoch, with crop offsets, flips and cutout
        centers for each."""
        if not self.train:
            return np.arange(self._n)[self.rank::self.workers], None, None, None
        rng = np.random.default_rng([self.seed, int(epoch)])
        perm = rng.permutation(self._n)
        # Drawn for all N positions before sharding so that every worker, any start_batch and
        # any replay see the same stream.
        offsets = rng.integers(0, 2 * self.crop_pad + 1, size=(self._n, 2)) if self.crop_pad else None
        if self.alternate_flip:
            # airbench94's derandomized flip: a random flip per image in epoch 1, then every
            # image flipped the other way each epoch (each image seen both ways in 2 epochs).
            first = np.random.default_rng([self.seed, 0x5EED]).random(self._n) < 0.5
            flips = (first ^ (int(epoch) % 2 == 0))[perm]
        else:
            flips = rng.random(self._n) < 0.5 if self.flip else None
        side = int(self.pad_to or 0) if not self.image_size else int(self.image_size)
        centers = rng.integers(0, max(side, 1), size=(self._n, 2)) if self.cutout else None
        sel = slice(self.rank, None, self.workers)
        take = slice(0, self._per_worker)

        def pick(a):
            return a[sel][take] if a is not None else None
        return perm[sel][take], pick(offsets), pick(flips), pick(centers)

    def epoch(self, epoch: int, start_batch: int = 0
              ) -> Iterator[Tuple[List["mx.nd.NDArray"], List["mx.nd.NDArray"]]]:
        """Yield (data_per_ctx, labels_per_ctx) for batches start_batch.. of the epoch.

        Batches are split over ctx_list like gluon.utils.split_and_load(even_split=False): the
        last device takes the remainder, and a final evaluation batch smaller than the number
        of devices yields one slice per sample (fewer lists entries than devices).
        """
        import mxnet as mx

        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, not {start_batch}")
        idx, offsets, flips, centers = self._plan(epoch)
        cpu = mx.cpu()
        for start in range(start_batch * self.batch_size, self._per_worker, self.batch_size):
            stop = min(start + self.batch_size, self._per_worker)
            size = stop - start
            n_slices = min(len(self.ctx_list), size)
            step = size // n_slices
            data, labels = [], []
            for k, ctx in enumerate(self.ctx_list[:n_slices]):
                lo = start + k * step
                hi = stop if k == n_slices - 1 else lo + step
                sel = mx.nd.array(idx[lo:hi], ctx=cpu, dtype="int32")
                x = mx.nd.take(self._images, sel).as_in_context(ctx)
                data.append(transform_batch(
                    x, mean=self.mean, std=self.std, pad_to=self.pad_to, image_size=self.image_size,
                    crop_pad=self.crop_pad, pad_mode=self.pad_mode,
                    crop_offsets=offsets[lo:hi] if offsets is not None else None,
                    flips=flips[lo:hi] if flips is not None else None, cutout=self.cutout,
                    cutout_centers=centers[lo:hi] if centers is not None else None))
                labels.append(mx.nd.take(self._labels, sel).as_in_context(ctx))
            yield data, labels
