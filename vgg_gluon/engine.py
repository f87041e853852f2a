"""Training and evaluation: one Session per run, short functions that return dicts of metrics."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from vgg_gluon import checkpoint as ckpt_mod
from vgg_gluon import data as data_mod
from vgg_gluon import models, report
from vgg_gluon.config import RunConfig
from vgg_gluon.errors import mxnet_error_reason
from vgg_gluon.optim import install_schedule, make_lr_scheduler, make_trainer, set_param_multipliers  # noqa: F401
from vgg_gluon.runtime import ctx_string, import_mxnet, resolve_ctx, seed_everything

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
def init_amp(target_precision_ops=None) -> None:
    """MXNet AMP: patch the operator namespaces to float16 (once, before any network is built).

    target_precision_ops=[] keeps every operator in float32 while the rest of AMP (loss scaling,
    overflow checks, skipped steps) stays active: how the tests exercise AMP on a CPU, which has
    no float16 matrix products."""
    from mxnet.contrib import amp
    if not getattr(amp.amp, "_amp_initialized", False):
        amp.init(target_dtype="float16", target_precision_ops=target_precision_ops)


def input_dtype(net) -> str:
    """The dtype the network's first parameter has (float16 after net.cast), so inputs match it."""
    for p in net.collect_params().values():
        return "float16" if p.dtype in ("float16", np.float16) else "float32"
    return "float32"


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
        if prev_loss is not None:
            value = _sum_scalars(prev_loss)
            if not math.isfinite(value):
                raise NonFiniteLoss(epoch, step, value)
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
    if prev_loss is not None:
        value = _sum_scalars(prev_loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(epoch, step, value)
    total_loss, total_corr = read_totals()
    seconds = partial.seconds + time.time() - t0
    trained = samples - partial.samples
    return {"train_loss": total_loss / max(samples, 1), "train_acc": total_corr / max(samples, 1),
            "seconds": seconds, "img_per_s": trained / max(time.time() - t0, 1e-9),
            "lr": current_lr(trainer)}


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
class Session:
    """Everything one run needs, built in the order MXNet wants: data, network on every context,
    hybridize, then the Trainer."""
    cfg: RunConfig
    ctx_list: list
    dataset: Any
    net: Any
    train_loader: Any = None
    eval_loader: Any = None
    val_loader: Any = None
    trainer: Any = None
    loss_fn: Any = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    dist: Any = None                 # distributed.DistContext with a dist_* kvstore, else None
    lookahead: Any = None            # fasttrain.Lookahead when cfg.lookahead

    @property
    def is_writer(self) -> bool:
        """This process writes the run folder: always, except distributed workers other than rank 0."""
        return self.dist is None or self.dist.is_writer

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    @property
    def input_shape(self):
        return data_mod.input_shape(self.cfg.dataset, self.cfg.image_size)

    def preprocessing(self) -> Dict[str, Any]:
        return {"dataset": self.cfg.dataset, "classes": list(self.dataset.classes),
                "mean": list(self.dataset.mean), "std": list(self.dataset.std),
                "input_shape": list(self.input_shape), "pad_to": data_mod.native_size(self.cfg.dataset),
                "image_size": self.cfg.image_size}


def build_session(cfg: RunConfig, *, ctx_list=None, train: bool = True, params_source=None,
                  dataset=None, eval_batch_size: Optional[int] = None) -> Session:
    """Load data, build the network on every context and (when training) the Trainer.

    params_source: None (fresh init), a Checkpoint, or a path to a bare .params file.
    """
    cfg.validate()
    ctx_list = ctx_list or resolve_ctx(cfg.ctx)
    if train and cfg.batch_size < len(ctx_list):
        from vgg_gluon.config import SettingError
        raise SettingError("batch_size", f"must be at least the number of devices ({len(ctx_list)}), "
                                         f"got {cfg.batch_size}", ("ctx",))
    if (cfg.amp or cfg.dtype == "float16") and any(c.device_type == "cpu" for c in ctx_list):
        from vgg_gluon.config import ConfigError
        raise ConfigError(f"{'--amp' if cfg.amp else '--dtype float16'} needs a GPU (--ctx gpu:0): MXNet has no "
                          "float16 matrix products on CPU; train in float32 there")
    seed_everything(cfg.seed)
    from vgg_gluon import distributed  # a dist kvstore joins the parameter server: rank, workers
    dist = distributed.create(cfg.kvstore) if train and distributed.wanted(cfg.kvstore) else None
    if cfg.amp:
        init_amp()  # before the network is built
    if dataset is None:
        dataset = data_mod.load_dataset(
            cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, train_limit=cfg.train_limit,
            test_limit=cfg.test_limit, val_split=cfg.val_split, seed=cfg.seed)
    net = build_network(cfg, len(dataset.classes))
    s = Session(cfg, ctx_list, dataset, net, dist=dist)
    shape = s.input_shape
    if isinstance(params_source, ckpt_mod.Checkpoint):
        load_checkpoint_params(net, params_source.file(ckpt_mod.PARAMS), ctx_list)
    elif params_source is not None:
        from vgg_gluon import foreign
        models.initialize(net, ctx_list, seed=cfg.seed)
        s.foreign_report = foreign.load_params_any(net, Path(params_source), ctx_list, input_shape=shape)
    else:
        models.initialize(net, ctx_list, seed=cfg.seed)
        if cfg.whiten:  # a fresh run: filters from the training data (a checkpoint brings its own)
            from vgg_gluon import fasttrain
            models.materialize(net, ctx_list[0], shape)
            fasttrain.whiten_stem(net, _whitening_images(dataset, cfg))
    if cfg.whiten:
        from vgg_gluon import fasttrain
        fasttrain.freeze_stem(net)
    set_param_multipliers(net, cfg)
    if cfg.dtype != "float32":
        net.cast(cfg.dtype)  # BatchNorm keeps float32 parameters (Gluon's BatchNorm.cast)
    if cfg.hybridize:
        # Several CPU contexts (the stand-in for several GPUs) with static_alloc: their BatchNorm
        # running statistics race. Measured here: 2-device runs of the same seed ended with
        # different running means in about half of the runs under load, never without
        # static_alloc or with one device. Not traced inside MXNet; the likely cause is that all
        # CPU contexts share one temp-space pool, which GPUs do not, so GPUs keep static_alloc.
        static = not (len(ctx_list) > 1 and all(c.device_type == "cpu" for c in ctx_list))
        net.hybridize(static_alloc=static, static_shape=static)
    common = dict(mean=dataset.mean, std=dataset.std, pad_to=data_mod.native_size(cfg.dataset),
                  image_size=cfg.image_size)
    # Training evaluates in batches of at least 256 (faster, same result); the evaluate command's
    # --batch-size is taken as given (memory).
    eval_bs = eval_batch_size or max(cfg.batch_size, 256)
    s.eval_loader = data_mod.BatchLoader(dataset.test, eval_bs, ctx_list, train=False, **common)
    if dataset.val is not None:
        s.val_loader = data_mod.BatchLoader(dataset.val, eval_bs, ctx_list, train=False, **common)
    s.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=cfg.label_smoothing <= 0)
    if train:
        batch, shard = cfg.batch_size, (0, 1)
        if dist is not None:  # --batch-size is global: each worker takes its share of every step
            batch, shard = distributed.local_batch_size(cfg.batch_size, dist.num_workers, len(ctx_list)), \
                (dist.rank, dist.num_workers)
        s.train_loader = data_mod.BatchLoader(
            dataset.train, batch, ctx_list, train=True, augment_crop_pad=cfg.augment_crop,
            augment_flip=cfg.augment_flip, seed=cfg.seed, shard=shard, alternate_flip=cfg.alternate_flip,
            augment_cutout=cfg.augment_cutout, **common)
        if len(s.train_loader) == 0:
            from vgg_gluon.config import ConfigError
            raise ConfigError(f"batch size {cfg.batch_size} is larger than the training set "
                              f"({len(dataset.train.labels)} images)")
        # Materialize deferred shapes on every context before the Trainer sees the parameters.
        net(mx.nd.zeros((1,) + tuple(shape), ctx=ctx_list[0], dtype=input_dtype(net)))
        if dist is not None:
            s.trainer = dist.make_trainer(net, cfg, len(s.train_loader))
        else:
            s.trainer = make_trainer(net, cfg, len(s.train_loader))
        if cfg.lookahead:
            s.lookahead = make_lookahead(net, cfg, len(s.train_loader))
    return s


def make_lookahead(net, cfg: RunConfig, steps_per_epoch: int):
    """The run's lookahead, its start and horizon in optimizer updates (rebuilt on resume)."""
    from vgg_gluon.fasttrain import Lookahead
    total = cfg.epochs * steps_per_epoch
    return Lookahead(net, every=cfg.lookahead_every, decay=cfg.lookahead_decay,
                     start_update=int(cfg.lookahead_start * total), total_updates=total)


def build_network(cfg: RunConfig, num_classes: int):
    """The run's network (architecture and the layer options of its recipe), not initialized."""
    opts = models.LayerOptions(activation=cfg.activation, bn_scale=cfg.bn_scale, bn_momentum=cfg.bn_momentum,
                               dirac_init=cfg.arch in models.LAYOUTS)
    return models.build_vgg(cfg.arch, num_classes, width=cfg.width, batch_norm=cfg.batch_norm,
                            fc_units=cfg.fc_units, dropout=cfg.dropout, opts=opts,
                            in_channels=data_mod.num_channels(cfg.dataset))


def _whitening_images(dataset, cfg: RunConfig) -> np.ndarray:
    """The first images of the training split as the network sees them (normalized, padded;
    no augmentation), NCHW float32 on the CPU."""
    from vgg_gluon.fasttrain import WHITEN_IMAGES
    x = mx.nd.array(dataset.train.images[:WHITEN_IMAGES], ctx=mx.cpu(), dtype=np.uint8)
    y = data_mod.transform_batch(x, mean=dataset.mean, std=dataset.std, pad_to=data_mod.native_size(cfg.dataset),
                                 image_size=cfg.image_size)
    return y.asnumpy()


def load_checkpoint_params(net, path: Path, ctx_list) -> None:
    """Load our own weights strictly; any problem is one CheckpointError line."""
    try:
        net.load_parameters(str(path), ctx=ctx_list)
    except Exception as exc:  # MXNetError, AssertionError (name/shape mismatch), OSError
        detail = mxnet_error_reason(exc, prefer=("shape", "missing"))
        raise ckpt_mod.CheckpointError(f"{path}: cannot load weights ({detail[:200]})") from None


def checkpoint_meta(s: Session, metrics: Dict[str, Any], best_acc: float, partial: Optional[Partial]) -> Dict[str, Any]:
    import vgg_gluon
    meta = {"config": s.cfg.to_dict(), "metrics": metrics, "best_acc": best_acc,
            "preprocessing": s.preprocessing(), "ctx": ctx_string(s.ctx_list),
            "num_update": int(s.trainer._optimizer.num_update), "mxnet": mx.__version__,
            "vgg_gluon": vgg_gluon.__version__}
    if partial is not None:
        meta["partial"] = partial.__dict__
    return meta


def checkpoint_extras(s: Session) -> Dict[str, Callable[[Path], None]]:
    """Files a checkpoint holds besides weights, optimizer state and metadata."""
    if s.lookahead is None:
        return {}
    from vgg_gluon.fasttrain import LOOKAHEAD_FILE
    return {LOOKAHEAD_FILE: s.lookahead.save}


def restore_extras(s: Session, c) -> None:
    """Resume: the lookahead state of checkpoint `c` (a run with lookahead must have one)."""
    if s.lookahead is None:
        return
    from vgg_gluon.fasttrain import LOOKAHEAD_FILE
    path = c.file(LOOKAHEAD_FILE)
    if not path.is_file():
        raise ckpt_mod.CheckpointError(f"{path}: missing (this run uses lookahead)")
    s.lookahead.load(path)


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
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        try:
            m = train_one_epoch(s.net, s.trainer, s.train_loader, s.loss_fn, epoch=epoch,
                                num_classes=s.num_classes, label_smoothing=cfg.label_smoothing,
                                partial=partial, log_interval=cfg.log_interval,
                                on_progress=on_progress, should_stop=should_stop, seed=cfg.seed,
                                after_step=s.lookahead.after_step if s.lookahead is not None else None)
        except StopRequested as stop:
            from vgg_gluon.distributed import statistics_before_mid_epoch_save
            statistics_before_mid_epoch_save(s)  # BatchNorm: one set over devices (and sync workers)
            c = None
            if s.is_writer and _params_finite(s.net):
                c = ckpt_mod.save_checkpoint(run_dir, s.net, s.trainer,
                                             checkpoint_meta(s, {}, best_acc, stop.partial),
                                             epoch=epoch - 1, step=stop.partial.step, keep_last=cfg.keep_last,
                                             extras=checkpoint_extras(s))
            return FitResult("stopped", epoch - 1, c, best_acc,
                             f"stopped in epoch {epoch} after step {stop.partial.step}")
        except NonFiniteLoss as exc:
            return FitResult("nonfinite", epoch - 1, None, best_acc, str(exc))
        partial = None
        if s.lookahead is not None:
            s.lookahead.epoch_end()  # the network takes the slow weights
        if s.dist is not None:  # same weights, BN statistics and train metrics on every worker
            m = s.dist.epoch_end(s.net, s.trainer, m, epoch)
        elif len(s.ctx_list) > 1:  # BatchNorm statistics: one set per device until now
            from vgg_gluon.distributed import average_device_copies
            average_device_copies(s.net)
        if s.lookahead is not None:
            s.lookahead.sync_from_net()
        test = evaluate(s.net, s.eval_loader, s.num_classes, tta=cfg.eval_tta)
        row = {"epoch": epoch, **{k: m[k] for k in ("train_loss", "train_acc")},
               "test_loss": test["loss"], "test_acc": test["acc"]}
        if cfg.eval_tta != "none":
            row["tta"] = cfg.eval_tta
        select_acc = test["acc"]
        if s.val_loader is not None:
            val = evaluate(s.net, s.val_loader, s.num_classes, tta=cfg.eval_tta)
            row.update(val_loss=val["loss"], val_acc=val["acc"])
            select_acc = val["acc"]  # choose "best" on validation data when there is some
        row.update(lr=m["lr"], seconds=m["seconds"], img_per_s=m["img_per_s"],
                   eval_img_per_s=test["img_per_s"])
        is_best = select_acc > best_acc
        best_acc = max(best_acc, select_acc)
        c = None
        if s.is_writer:
            if not _params_finite(s.net):
                return FitResult("nonfinite", epoch - 1, None, best_acc,
                                 f"parameters became NaN/Inf in epoch {epoch}: not saved; lower --lr")
            c = ckpt_mod.save_checkpoint(run_dir, s.net, s.trainer, checkpoint_meta(s, row, best_acc, None),
                                         epoch=epoch, is_best=is_best, keep_last=cfg.keep_last,
                                         extras=checkpoint_extras(s))
            s.history = [r for r in s.history if int(r["epoch"]) < epoch] + [row]
            report.write_history(run_dir / "history.csv", s.history)
            try:
                report.plot_curves(run_dir / "curves.png", s.history)
            except Exception as exc:  # a plot must never stop training
                log.warning("could not draw curves.png: %s", exc)
        if on_epoch:
            on_epoch(row, is_best)
        if should_stop and should_stop() and epoch < cfg.epochs:
            return FitResult("stopped", epoch, c, best_acc, f"stopped after epoch {epoch}")
    return FitResult("finished", cfg.epochs, None, best_acc, "")
