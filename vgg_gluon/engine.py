"""Training and evaluation: short functions that return dicts of metrics, and `fit`, which trains a
Session (session.py) epoch by epoch and commits a checkpoint after each."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from vgg_gluon import checkpoint as ckpt_mod
from vgg_gluon import report
from vgg_gluon.optim import install_schedule, make_lr_scheduler, make_trainer, set_param_multipliers  # noqa: F401
from vgg_gluon.runtime import import_mxnet
from vgg_gluon.session import (  # noqa: F401  (re-exported: the CLI, inspection and tests build sessions here)
    Session,
    build_network,
    build_session,
    checkpoint_extras,
    checkpoint_meta,
    init_amp,
    input_dtype,
    load_checkpoint_params,
    make_lookahead,
    restore_extras,
)

log = logging.getLogger(__name__)
mx = import_mxnet()
from mxnet import autograd, gluon  # noqa: E402  (after the checked import above)


class NonFiniteLoss(Exception):
    """Training produced NaN/Inf; the last good checkpoint is left as it is."""

    def __init__(self, epoch: int, step: int, value: float):
        super().__init__(f"loss became {value} at epoch {epoch}, step {step}: training stopped; "
                         "lower --lr, add --warmup-epochs or turn on --batch-norm")
        self.epoch, self.step = epoch, step


class StopRequested(Exception):
    """Raised inside the loop when the user asked to stop (Ctrl-C / SIGTERM)."""


@dataclass
class Progress:
    """What the progress callback sees every `log_interval` steps."""
    epoch: int
    step: int
    steps: int
    loss: float
    acc: float
    img_per_s: float
    lr: float


@dataclass
class Partial:
    """Sums of an unfinished epoch, saved in a mid-epoch checkpoint so the epoch's metrics stay whole."""
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# building blocks
def current_lr(trainer) -> float:
    opt = trainer._optimizer
    return float(opt.lr_scheduler(opt.num_update) if opt.lr_scheduler else opt.lr)


def step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + step) % (2 ** 31)


def _sum_scalars(arrays) -> float:
    return float(sum(a.asscalar() for a in arrays))


# ------------------------------------------------------------------------------------------------
# one epoch of training, one pass of evaluation
def train_one_epoch(net, trainer, loader, loss_fn, *, epoch: int, num_classes: int,
                    label_smoothing: float = 0.0, partial: Optional[Partial] = None,
                    log_interval: int = 20, on_progress: Optional[Callable[[Progress], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None, seed: Optional[int] = None,
                    after_step: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Train for one epoch (from `partial.step` on) and return its metrics.

    Loss and accuracy are summed on the devices and read every `log_interval` steps; the only
    per-step read is the previous step's loss (one step behind, so the device never waits) to stop
    within a step of a NaN. Raises StopRequested (with `.partial`) when `should_stop()` turns true.
    """
    partial = partial or Partial()
    steps = len(loader)
    loss_acc = [mx.nd.zeros((1,), ctx=c) for c in loader.ctx_list]
    corr_acc = [mx.nd.zeros((1,), ctx=c) for c in loader.ctx_list]
    read_loss, read_corr = partial.loss_sum, partial.correct
    samples, prev_loss, step = partial.samples, None, partial.step
    t0, window_t, window_n = time.time(), time.time(), 0

    def read_totals():
        return read_loss + _sum_scalars(loss_acc), read_corr + _sum_scalars(corr_acc)

    in_dtype = input_dtype(net)
    use_amp = getattr(trainer, "_amp_loss_scaler", None) is not None
    for data, labels in loader.epoch(epoch, start_batch=partial.step):
        if seed is not None:
            mx.random.seed(step_seed(seed, epoch, step))
        outs, losses = _forward_backward(net, trainer, loss_fn, data, labels, num_classes=num_classes,
                                         label_smoothing=label_smoothing, in_dtype=in_dtype, use_amp=use_amp)
        n = sum(x.shape[0] for x in data)
        trainer.step(n)
        if after_step is not None:
            after_step(int(trainer._optimizer.num_update))
        step_loss = []
        for i, (o, y, lo) in enumerate(zip(outs, labels, losses)):
            s = lo.sum()
            step_loss.append(s)
            loss_acc[i] += s
            corr_acc[i] += (o.argmax(axis=1) == y).sum()
        _check_finite(prev_loss, epoch, step)
        prev_loss = step_loss
        step += 1
        samples += n
        window_n += n
        if on_progress and (step % log_interval == 0 or step == steps):
            total_loss, total_corr = read_totals()
            now = time.time()
            on_progress(Progress(epoch, step, steps, total_loss / max(samples, 1),
                                 total_corr / max(samples, 1), window_n / max(now - window_t, 1e-9),
                                 current_lr(trainer)))
            window_t, window_n = now, 0
        if should_stop and should_stop() and step < steps:
            total_loss, total_corr = read_totals()
            exc = StopRequested()
            exc.partial = Partial(step, total_loss, total_corr, samples,
                                  partial.seconds + time.time() - t0)
            raise exc
    _check_finite(prev_loss, epoch, step)
    total_loss, total_corr = read_totals()
    seconds = partial.seconds + time.time() - t0
    trained = samples - partial.samples
    return {"train_loss": total_loss / max(samples, 1), "train_acc": total_corr / max(samples, 1),
            "seconds": seconds, "img_per_s": trained / max(time.time() - t0, 1e-9),
            "lr": current_lr(trainer)}


def _forward_backward(net, trainer, loss_fn, data, labels, *, num_classes: int, label_smoothing: float,
                      in_dtype: str, use_amp: bool):
    """One step's forward pass on every device's slice and the backward pass (AMP: of the scaled
    loss); returns the logits and the per-sample losses."""
    with autograd.record():
        # float16 networks: fp16 in, fp32 logits out so the softmax and metrics stay fp32.
        outs = [net(x.astype(in_dtype, copy=False)).astype("float32", copy=False) for x in data]
        if label_smoothing > 0:
            targets = [mx.nd.one_hot(y, num_classes) * (1 - label_smoothing) + label_smoothing / num_classes
                       for y in labels]
        else:
            targets = labels
        losses = [loss_fn(o, t) for o, t in zip(outs, targets)]
        if use_amp:
            from mxnet.contrib import amp
            with amp.scale_loss(losses, trainer) as scaled:
                autograd.backward(scaled)
    if not use_amp:
        autograd.backward(losses)
    return outs, losses


def _check_finite(step_loss, epoch: int, step: int) -> None:
    """The summed loss of a step (read one step late, so the device never waits) must be finite."""
    if step_loss is not None:
        value = _sum_scalars(step_loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(epoch, step, value)


def evaluate(net, loader, num_classes: int, loss_fn=None, tta: str = "none") -> Dict[str, Any]:
    """Accuracy, mean loss, per-class accuracy, confusion matrix and img/s over one split.

    tta: none | flip | flip-translate (fasttrain.tta_logits); the result says which ("tta")."""
    from vgg_gluon.fasttrain import tta_logits
    loss_fn = loss_fn or gluon.loss.SoftmaxCrossEntropyLoss()
    t0 = time.time()
    loss_sums, preds, truths, in_top = [], [], [], []
    in_dtype = input_dtype(net)
    top_k = min(5, num_classes)

    def forward(v):
        return net(v.astype(in_dtype, copy=False)).astype("float32", copy=False)
    for data, labels in loader.epoch(0):
        for x, y in zip(data, labels):
            out = tta_logits(forward, x, tta)
            loss_sums.append(loss_fn(out, y).sum())
            preds.append(out.argmax(axis=1).as_in_context(mx.cpu()))
            truths.append(y.as_in_context(mx.cpu()))
            top = mx.nd.topk(out, axis=1, k=top_k)            # (B, k) class indices
            in_top.append((top == y.reshape((-1, 1))).sum())
    pred = mx.nd.concat(*preds, dim=0).asnumpy().astype(np.int64) if preds else np.zeros(0, np.int64)
    true = mx.nd.concat(*truths, dim=0).asnumpy().astype(np.int64) if truths else np.zeros(0, np.int64)
    loss_total = _sum_scalars(loss_sums)
    seconds = time.time() - t0
    n = len(true)
    confusion = report.confusion_matrix(true, pred, num_classes)
    per_class = [float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else float("nan")
                 for c in range(num_classes)]
    top_hits = _sum_scalars(in_top)
    return {"loss": loss_total / max(n, 1), "acc": float((pred == true).mean()) if n else float("nan"),
            "top5_acc": top_hits / n if n else float("nan"), "top_k": top_k,
            "samples": n, "seconds": seconds, "img_per_s": n / max(seconds, 1e-9),
            "per_class_acc": per_class, "confusion": confusion.tolist(), "tta": tta}


# ------------------------------------------------------------------------------------------------
# a run
@dataclass
class FitResult:
    status: str                      # finished | stopped | nonfinite
    epoch: int                       # epochs completed
    checkpoint: Optional[Any] = None
    best_acc: float = float("nan")
    message: str = ""


def _params_finite(net) -> bool:
    for p in net.collect_params().values():
        if not np.isfinite(p.list_data()[0].asnumpy()).all():
            return False
    return True


def fit(s: Session, run_dir: Path, *, start_epoch: int = 0, partial: Optional[Partial] = None,
        best_acc: float = -1.0, on_progress=None, on_epoch=None,
        should_stop: Optional[Callable[[], bool]] = None) -> FitResult:
    """Train epochs start_epoch+1 .. cfg.epochs, committing a checkpoint after each.

    Epoch e's data order, augmentation and dropout seed depend only on (seed, e), so a resumed run
    replays exactly what an uninterrupted one would have done.
    """
    cfg = s.cfg
    run_dir = Path(run_dir)
    freeze = None
    if cfg.stem_bias_epochs and s.net.stem_conv is not None:
        from vgg_gluon.fasttrain import StemBiasFreeze
        freeze = StemBiasFreeze(s.net.stem_conv.bias, cfg.stem_bias_epochs)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if freeze is not None:
            freeze.epoch_start(epoch)
        try:
            m = train_one_epoch(s.net, s.trainer, s.train_loader, s.loss_fn, epoch=epoch,
                                num_classes=s.num_classes, label_smoothing=cfg.label_smoothing,
                                partial=partial, log_interval=cfg.log_interval,
                                on_progress=on_progress, should_stop=should_stop, seed=cfg.seed,
                                after_step=_after_step(s.lookahead, freeze))
        except StopRequested as stop:
            return _save_stopped(s, run_dir, epoch, stop.partial, best_acc)
        except NonFiniteLoss as exc:
            return FitResult("nonfinite", epoch - 1, None, best_acc, str(exc))
        partial = None
        m = _epoch_end(s, m, epoch)
        row, select_acc = _evaluate_epoch(s, epoch, m)
        is_best = select_acc > best_acc
        best_acc = max(best_acc, select_acc)
        c = None
        if s.is_writer:
            if not _params_finite(s.net):
                return FitResult("nonfinite", epoch - 1, None, best_acc,
                                 f"parameters became NaN/Inf in epoch {epoch}: not saved; lower --lr")
            c = _commit_epoch(s, run_dir, epoch, row, best_acc, is_best)
        if on_epoch:
            on_epoch(row, is_best)
        if should_stop and should_stop() and epoch < cfg.epochs:
            return FitResult("stopped", epoch, c, best_acc, f"stopped after epoch {epoch}")
    return FitResult("finished", cfg.epochs, None, best_acc, "")


def _after_step(lookahead, freeze) -> Optional[Callable[[int], None]]:
    """What runs after each optimizer step: the frozen stem bias put back, then lookahead."""
    hooks = [h.after_step for h in (freeze, lookahead) if h is not None]
    if len(hooks) < 2:
        return hooks[0] if hooks else None

    def both(num_update: int) -> None:
        for h in hooks:
            h(num_update)
    return both


def _save_stopped(s: Session, run_dir: Path, epoch: int, partial: Partial, best_acc: float) -> FitResult:
    """Ctrl-C / SIGTERM inside `epoch`: one set of BatchNorm statistics, then a mid-epoch checkpoint."""
    from vgg_gluon.distributed import statistics_before_mid_epoch_save
    statistics_before_mid_epoch_save(s)  # BatchNorm: one set over devices (and sync workers)
    c = None
    if s.is_writer and _params_finite(s.net):
        c = ckpt_mod.save_checkpoint(run_dir, s.net, s.trainer, checkpoint_meta(s, {}, best_acc, partial),
                                     epoch=epoch - 1, step=partial.step, keep_last=s.cfg.keep_last,
                                     extras=checkpoint_extras(s))
    return FitResult("stopped", epoch - 1, c, best_acc, f"stopped in epoch {epoch} after step {partial.step}")


def _epoch_end(s: Session, m: Dict[str, Any], epoch: int) -> Dict[str, Any]:
    """One network for evaluation and the checkpoint: lookahead's slow weights, and the devices'
    (and workers') BatchNorm statistics and train metrics made one."""
    if s.lookahead is not None:
        s.lookahead.epoch_end()  # the network takes the slow weights
    if s.dist is not None:  # same weights, BN statistics and train metrics on every worker
        m = s.dist.epoch_end(s.net, s.trainer, m, epoch)
    elif len(s.ctx_list) > 1:  # BatchNorm statistics: one set per device until now
        from vgg_gluon.distributed import average_device_copies
        average_device_copies(s.net)
    if s.lookahead is not None:
        s.lookahead.sync_from_net()
    return m


def _evaluate_epoch(s: Session, epoch: int, m: Dict[str, Any]):
    """The epoch's history row, and the accuracy "best" is chosen on (validation when there is some)."""
    cfg = s.cfg
    test = evaluate(s.net, s.eval_loader, s.num_classes, tta=cfg.eval_tta)
    row = {"epoch": epoch, **{k: m[k] for k in ("train_loss", "train_acc")},
           "test_loss": test["loss"], "test_acc": test["acc"]}
    if cfg.eval_tta != "none":
        row["tta"] = cfg.eval_tta
    select_acc = test["acc"]
    if s.val_loader is not None:
        val = evaluate(s.net, s.val_loader, s.num_classes, tta=cfg.eval_tta)
        row.update(val_loss=val["loss"], val_acc=val["acc"])
        select_acc = val["acc"]
    row.update(lr=m["lr"], seconds=m["seconds"], img_per_s=m["img_per_s"], eval_img_per_s=test["img_per_s"])
    return row, select_acc


def _commit_epoch(s: Session, run_dir: Path, epoch: int, row: Dict[str, Any], best_acc: float, is_best: bool):
    """The end-of-epoch checkpoint, then history.csv and curves.png (a plot never stops training)."""
    c = ckpt_mod.save_checkpoint(run_dir, s.net, s.trainer, checkpoint_meta(s, row, best_acc, None),
                                 epoch=epoch, is_best=is_best, keep_last=s.cfg.keep_last, extras=checkpoint_extras(s))
    s.history = [r for r in s.history if int(r["epoch"]) < epoch] + [row]
    report.write_history(run_dir / "history.csv", s.history)
    try:
        report.plot_curves(run_dir / "curves.png", s.history)
    except Exception as exc:  # a plot must never stop training
        log.warning("could not draw curves.png: %s", exc)
    return c
