"""The optimizer of a run: its parameters, the learning-rate schedule (linear warmup, then
constant / step / cosine / linear, per iteration) and the Trainer, the same for one device, several
devices and the workers of a parameter server; and its precision (`--amp`: MXNet AMP, float16
with dynamic loss scaling on GPUs, bfloat16 on CPUs).

gluoncv's `LRScheduler` and `LRSequential` compute the shapes; `PhaseScheduler` only makes a phase
of a single iteration (or less) well defined, where gluoncv divides by zero (`cos(pi * T / N)`
with N = 0): a one-step phase takes the value at its start, as its first step would in a longer
phase. Every other value is gluoncv's, to the last bit.
"""
from __future__ import annotations

from typing import Any, Dict

from vgg_gluon.config import RunConfig
from vgg_gluon.runtime import import_mxnet

import_mxnet()  # thread settings first: gluoncv imports mxnet
from gluoncv.utils import LRScheduler, LRSequential  # noqa: E402
from mxnet import gluon  # noqa: E402


class PhaseScheduler(LRScheduler):
    """gluoncv's LRScheduler, defined for phases of one iteration or less."""

    def update(self, num_update):
        if self.mode in ("linear", "poly", "cosine") and self.niters - 1 <= 0:
            self.learning_rate = self.base_lr  # factor 1: the value at T = 0
            return
        super().update(num_update)


def make_lr_scheduler(cfg: RunConfig, iters_per_epoch: int) -> LRSequential:
    """Per-iteration schedule of a run: linear warmup from `lr_start` x peak over `warmup_epochs`,
    then constant / step / cosine / linear (to `lr_end` x peak) over the remaining epochs; "linear"
    after a warmup is the triangular (one-cycle) schedule of the fast-training recipes. The peak is
    `cfg.effective_lr()` (lr scaled to the batch size when lr_base_batch is set)."""
    warm = cfg.warmup_epochs
    lr = cfg.effective_lr()
    parts = []
    if warm > 0:
        parts.append(PhaseScheduler("linear", base_lr=lr * cfg.lr_start, target_lr=lr, nepochs=warm,
                                    iters_per_epoch=iters_per_epoch))
    kwargs = {}
    if cfg.lr_schedule == "step":
        kwargs = dict(step_epoch=[s - warm for s in cfg.lr_steps if s > warm] or [cfg.epochs * 10],
                      step_factor=cfg.lr_factor)
    parts.append(PhaseScheduler(cfg.lr_schedule, base_lr=lr, target_lr=lr * cfg.lr_end, nepochs=cfg.epochs - warm,
                                iters_per_epoch=iters_per_epoch, **kwargs))
    return LRSequential(parts)


def set_param_multipliers(net, cfg: RunConfig) -> None:
    """BatchNorm shifts/scales: LR x bias_lr_mult (airbench94's `bias_scaler`, which scales the
    BatchNorm biases only: other biases, such as the whitened stem's, keep the base LR; with 64x
    there CIFAR-10's first epoch reached 48.5%, with 1x 58.7%). With no_wd_bias, BatchNorm
    parameters and every bias get no weight decay (gluoncv's --no-wd). Set on the Parameters,
    which every optimizer (local, devices, dist servers) reads."""
    for name, p in net.collect_params().items():
        if name.endswith(("_beta", "_gamma")):
            p.lr_mult = cfg.bias_lr_mult
        if cfg.no_wd_bias and name.endswith(("_bias", "_beta", "_gamma")):
            p.wd_mult = 0.0


def optimizer_params(cfg: RunConfig, iters_per_epoch: int, schedule=None) -> Dict[str, Any]:
    """What gluon.Trainer's optimizer gets: weight decay, the schedule, momentum for sgd/nag/muon,
    muon's filter settings and, for float16 weights, float32 master weights (multi_precision)."""
    params: Dict[str, Any] = {"wd": cfg.wd, "lr_scheduler": schedule or make_lr_scheduler(cfg, iters_per_epoch)}
    if cfg.optimizer in ("sgd", "nag", "muon"):
        params["momentum"] = cfg.momentum
    if cfg.optimizer == "muon":  # one schedule: the filters' LR is the others' x muon_scale
        import vgg_gluon.muon  # noqa: F401 - registers "muon" with MXNet
        params.update(muon_momentum=cfg.muon_momentum, muon_scale=cfg.muon_lr / cfg.effective_lr())
    if cfg.dtype == "float16":
        params["multi_precision"] = True  # float32 master weights and updates
    return params


_amp_state = {"dtype": None}  # what this process's amp.init patched the operators to


def amp_dtype(ctx_list) -> str:
    """What `--amp` computes in: float16 on GPUs (with dynamic loss scaling), bfloat16 on CPUs
    (oneDNN's AVX512-BF16 kernels; float32's exponent range, so no loss scaling)."""
    return "bfloat16" if ctx_list[0].device_type == "cpu" else "float16"


def init_amp(target_dtype: str = "float16", target_precision_ops=None) -> None:
    """MXNet AMP: patch the operator namespaces to `target_dtype` (once per process, before any
    network is built).

    target_precision_ops=[] keeps every operator in float32 while the rest of AMP (loss scaling,
    overflow checks, skipped steps) stays active: how the tests exercise float16 AMP on a CPU,
    which has no float16 matrix products."""
    from mxnet.contrib import amp
    if not getattr(amp.amp, "_amp_initialized", False):
        amp.init(target_dtype=target_dtype, target_precision_ops=target_precision_ops)
        _amp_state["dtype"] = target_dtype


def make_trainer(net, cfg: RunConfig, iters_per_epoch: int, *, schedule=None, trainer_cls=None,
                 **trainer_kwargs):
    """The run's Trainer (gluon.Trainer, or a subclass such as distributed.DistTrainer), with AMP's
    dynamic loss scaling when the run uses AMP. Call it after the parameters are initialized on
    every context."""
    trainer_kwargs.setdefault("kvstore", cfg.kvstore)
    trainer = (trainer_cls or gluon.Trainer)(net.collect_params(), cfg.optimizer,
                                             optimizer_params(cfg, iters_per_epoch, schedule), **trainer_kwargs)
    if cfg.amp and _amp_state["dtype"] != "bfloat16":  # bfloat16 has float32's range: no scaling
        from mxnet.contrib import amp
        amp.init_trainer(trainer)  # dynamic loss scaling; skips steps whose gradients overflow
    return trainer


def install_schedule(trainer, cfg: RunConfig, iters_per_epoch: int) -> None:
    """Put the settings' schedule into a trainer whose optimizer state was loaded (at its update count)."""
    trainer._optimizer.lr_scheduler = make_lr_scheduler(cfg, iters_per_epoch)
