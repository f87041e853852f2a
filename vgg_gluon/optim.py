"""The learning-rate schedule: linear warmup, then constant / step / cosine / linear, per iteration.

gluoncv's `LRScheduler` and `LRSequential` compute the shapes; `PhaseScheduler` only makes a phase
of a single iteration (or less) well defined, where gluoncv divides by zero (`cos(pi * T / N)`
with N = 0): a one-step phase takes the value at its start, as its first step would in a longer
phase. Every other value is gluoncv's, to the last bit.
"""
from __future__ import annotations

from vgg_gluon.config import RunConfig
from vgg_gluon.runtime import import_mxnet

import_mxnet()  # thread settings first: gluoncv imports mxnet
from gluoncv.utils import LRScheduler, LRSequential  # noqa: E402


class PhaseScheduler(LRScheduler):
    """gluoncv's LRScheduler, defined for phases of one iteration or less."""

    def update(self, num_update):
        if self.mode in ("linear", "poly", "cosine") and self.niters - 1 <= 0:
            self.learning_rate = self.base_lr  # factor 1: the value at T = 0
            return
        super().update(num_update)


def make_lr_scheduler(cfg: RunConfig, iters_per_epoch: int) -> LRSequential:
    """Per-iteration schedule of a run: linear warmup from 0 over `warmup_epochs`, then
    constant / step / cosine / linear (to 0) over the remaining epochs; "linear" after a warmup is
    the triangular (one-cycle) schedule of the fast-training recipes. The peak is
    `cfg.effective_lr()` (lr scaled to the batch size when lr_base_batch is set)."""
    warm = cfg.warmup_epochs
    lr = cfg.effective_lr()
    parts = []
    if warm > 0:
        parts.append(PhaseScheduler("linear", base_lr=0.0, target_lr=lr, nepochs=warm,
                                    iters_per_epoch=iters_per_epoch))
    kwargs = {}
    if cfg.lr_schedule == "step":
        kwargs = dict(step_epoch=[s - warm for s in cfg.lr_steps if s > warm] or [cfg.epochs * 10],
                      step_factor=cfg.lr_factor)
    parts.append(PhaseScheduler(cfg.lr_schedule, base_lr=lr, target_lr=0.0, nepochs=cfg.epochs - warm,
                                iters_per_epoch=iters_per_epoch, **kwargs))
    return LRSequential(parts)
