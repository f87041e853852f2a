"""A run's Session: everything one run needs (data, network on every context, loaders, Trainer,
lookahead), built in the order MXNet wants; and what a checkpoint holds of it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from vgg_gluon import checkpoint as ckpt_mod
from vgg_gluon import data as data_mod
from vgg_gluon import models
from vgg_gluon.config import RunConfig
from vgg_gluon.errors import mxnet_error_reason
from vgg_gluon.optim import amp_dtype, init_amp, make_trainer, set_param_multipliers
from vgg_gluon.runtime import ctx_string, import_mxnet, resolve_ctx, seed_everything

log = logging.getLogger(__name__)
mx = import_mxnet()
from mxnet import gluon  # noqa: E402  (after the checked import above)


def input_dtype(net) -> str:
    """The dtype the network's first parameter has (float16 after net.cast), so inputs match it."""
    for p in net.collect_params().values():
        return "float16" if p.dtype in ("float16", np.float16) else "float32"
    return "float32"


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
                  dataset=None, eval_batch_size: Optional[int] = None, resuming: bool = False) -> Session:
    """Load data, build the network on every context and (when training) the Trainer, in the order
    MXNet wants: data, network initialized or loaded on every context, hybridize, then the Trainer.

    params_source: None (fresh init), a Checkpoint, or a path to a bare .params file.
    resuming: the run exists (resume): what it was started with is not refused for speed alone.
    """
    cfg.validate()
    ctx_list = ctx_list or resolve_ctx(cfg.ctx)
    _check_devices(cfg, ctx_list, train, resuming)
    seed_everything(cfg.seed)
    from vgg_gluon import distributed  # a dist kvstore joins the parameter server: rank, workers
    dist = distributed.create(cfg.kvstore) if train and distributed.wanted(cfg.kvstore) else None
    if cfg.amp and train:  # before the network is built; evaluation alone runs in float32
        init_amp(amp_dtype(ctx_list))
    if dataset is None:
        dataset = data_mod.load_dataset(
            cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, train_limit=cfg.train_limit,
            test_limit=cfg.test_limit, val_split=cfg.val_split, seed=cfg.seed)
    s = Session(cfg, ctx_list, dataset, build_network(cfg, len(dataset.classes), ctx_list), dist=dist)
    _place_network(s, params_source)
    _make_loaders(s, eval_batch_size, train)
    if train:
        # Materialize deferred shapes on every context before the Trainer sees the parameters.
        s.net(mx.nd.zeros((1,) + tuple(s.input_shape), ctx=ctx_list[0], dtype=input_dtype(s.net)))
        if dist is not None:
            s.trainer = dist.make_trainer(s.net, cfg, len(s.train_loader))
        else:
            s.trainer = make_trainer(s.net, cfg, len(s.train_loader))
        if cfg.lookahead:
            s.lookahead = make_lookahead(s.net, cfg, len(s.train_loader))
    return s


def _check_devices(cfg: RunConfig, ctx_list, train: bool, resuming: bool = False) -> None:
    """What the devices cannot do: fewer samples per step than devices, float16 on a CPU, and
    bfloat16 AMP on a CPU without bfloat16 kernels or, for a new run where it measured slower (no
    AMX), with BatchNorm. A run started with --amp on an AMX machine resumes on any CPU with
    bfloat16 kernels: slower there, but refusing would strand its checkpoints."""
    from vgg_gluon.config import ConfigError, SettingError
    if train and cfg.batch_size < len(ctx_list):
        raise SettingError("batch_size", f"must be at least the number of devices ({len(ctx_list)}), "
                                         f"got {cfg.batch_size}", ("ctx",))
    on_cpu = any(c.device_type == "cpu" for c in ctx_list)
    if cfg.dtype == "float16" and on_cpu:
        raise ConfigError("--dtype float16 needs a GPU (--ctx gpu:0): MXNet has no float16 matrix products on "
                          "CPU; train in float32 there, or with --amp (bfloat16) on a CPU with AVX512-BF16")
    if cfg.amp and on_cpu and train:
        from vgg_gluon import _env
        if not _env.onednn_has_bf16():
            raise ConfigError("--amp on a CPU trains in bfloat16, which needs a CPU with AVX512-BF16 (this one has "
                              "none): use a GPU (--ctx gpu:0), or train in float32 (--no-amp; amp: false in a "
                              "recipe file)")
        if cfg.batch_norm and not resuming and not _env.onednn_uses_amx():
            raise ConfigError("--amp on a CPU (bfloat16) is slower with BatchNorm unless the CPU has AMX (0.72-0.80x "
                              "float32 with AVX512-BF16 alone, benchmarks/README.md): train in float32 (--no-amp; "
                              "amp: false in a recipe file), or use --no-batch-norm")


def _place_network(s: Session, params_source) -> None:
    """The network's weights on every context (initialized, a checkpoint's, or a bare file's, with
    the whitening stem when asked), its LR/wd multipliers, dtype, and compilation."""
    cfg, net, ctx_list, shape = s.cfg, s.net, s.ctx_list, s.input_shape
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
            fasttrain.whiten_stem(net, _whitening_images(s.dataset, cfg))
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
        # Re-checked 2026-12-03, static_alloc forced on: without lookahead 1 pair of 3 differed
        # (up to 1e-3); with it (it waits for the step every few steps) 0 of 3. Still off.
        static = not (len(ctx_list) > 1 and all(c.device_type == "cpu" for c in ctx_list))
        net.hybridize(static_alloc=static, static_shape=static)


def _make_loaders(s: Session, eval_batch_size: Optional[int], train: bool) -> None:
    """The test (and validation) loaders, the loss, and for training the train loader, sharded
    over the workers of a distributed run."""
    cfg, dataset, ctx_list = s.cfg, s.dataset, s.ctx_list
    common = dict(mean=dataset.mean, std=dataset.std, pad_to=data_mod.native_size(cfg.dataset),
                  image_size=cfg.image_size)
    # Training evaluates in batches of at least 256 (faster, same result); the evaluate command's
    # --batch-size is taken as given (memory).
    eval_bs = eval_batch_size or max(cfg.batch_size, 256)
    s.eval_loader = data_mod.BatchLoader(dataset.test, eval_bs, ctx_list, train=False, **common)
    if dataset.val is not None:
        s.val_loader = data_mod.BatchLoader(dataset.val, eval_bs, ctx_list, train=False, **common)
    s.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=cfg.label_smoothing <= 0)
    if not train:
        return
    batch, shard = cfg.batch_size, (0, 1)
    if s.dist is not None:  # --batch-size is global: each worker takes its share of every step
        from vgg_gluon import distributed
        batch = distributed.local_batch_size(cfg.batch_size, s.dist.num_workers, len(ctx_list))
        shard = (s.dist.rank, s.dist.num_workers)
    s.train_loader = data_mod.BatchLoader(
        dataset.train, batch, ctx_list, train=True, augment_crop_pad=cfg.augment_crop, augment_pad=cfg.augment_pad,
        augment_flip=cfg.augment_flip, seed=cfg.seed, shard=shard, alternate_flip=cfg.alternate_flip,
        augment_cutout=cfg.augment_cutout, **common)
    if len(s.train_loader) == 0:
        from vgg_gluon.config import ConfigError
        raise ConfigError(f"batch size {cfg.batch_size} is larger than the training set "
                          f"({len(dataset.train.labels)} images)")


def make_lookahead(net, cfg: RunConfig, steps_per_epoch: int):
    """The run's lookahead, its start and horizon in optimizer updates (rebuilt on resume)."""
    from vgg_gluon.fasttrain import Lookahead
    total = cfg.epochs * steps_per_epoch
    return Lookahead(net, every=cfg.lookahead_every, decay=cfg.lookahead_decay,
                     start_update=int(cfg.lookahead_start * total), total_updates=total)


def build_network(cfg: RunConfig, num_classes: int, ctx_list: Sequence[mx.Context] = ()):
    """The run's network (architecture and the layer options of its recipe), not initialized.
    oneDNN's fast paths (cpu_layers) only when every device of `ctx_list` is a CPU."""
    opts = models.LayerOptions(activation=cfg.activation, bn_scale=cfg.bn_scale, bn_momentum=cfg.bn_momentum,
                               bn_eps=cfg.bn_eps, dirac_init=cfg.arch in models.LAYOUTS,
                               cpu_fast_paths=all(c.device_type == "cpu" for c in ctx_list))
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


def checkpoint_meta(s: Session, metrics: Dict[str, Any], best_acc: float, partial: Optional[Any]) -> Dict[str, Any]:
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
