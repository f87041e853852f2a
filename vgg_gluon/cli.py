"""Command-line interface: parses, validates and calls; the machine learning lives elsewhere."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import click

import vgg_gluon
from vgg_gluon.cli_group import SuggestingGroup
from vgg_gluon.config import (
    ACTIVATIONS,
    ARCHS,
    DATASETS,
    DTYPES,
    KVSTORES,
    OPTIMIZERS,
    SCHEDULES,
    TTA_MODES,
    ConfigError,
    RunConfig,
)

log = logging.getLogger("vgg_gluon")

EXIT_NONFINITE = 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

# Settings a recipe for a data set changes from RunConfig's defaults when no --config is given.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "fashion-mnist": {},
    "cifar10": {"augment_crop": 4, "augment_flip": True, "epochs": 15},
}
# Settings that may change when a run is resumed; the others define the run.
RESUME_OVERRIDABLE = {"epochs", "ctx", "kvstore", "data_dir", "keep_last", "log_interval"}


# ------------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, no traceback
def _user_errors():
    """Exception types that are the user's to fix, imported lazily (mxnet loads slowly)."""
    from vgg_gluon.checkpoint import CheckpointError
    from vgg_gluon.data import DataError
    from vgg_gluon.runtime import RuntimeSetupError
    types = [ConfigError, DataError, CheckpointError, RuntimeSetupError]
    try:
        from vgg_gluon.foreign import ParamsError
        types.append(ParamsError)
    except ImportError:
        pass
    return tuple(types)


def friendly_errors(fn):
    """Turn known problems into `Error: <one line>` with exit 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            import errno
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            if exc.errno == errno.ENOSPC:
                raise click.ClickException(
                    f"{where}disk full: free some space; the previous checkpoint is intact") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise click.ClickException(
                    f"{where}not writable ({exc.strerror}): choose another --output-dir") from None
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_SIGINT)
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                raise click.ClickException(str(exc)) from None
            from vgg_gluon.runtime import explain_mxnet_error
            advice = explain_mxnet_error(exc)
            if advice:
                raise click.ClickException(advice) from None
            if os.environ.get("VGG_GLUON_DEBUG"):
                raise
            # MXNet's messages start with "Traceback (most recent call last):" and C++ frames.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            first = next((ln for ln in lines if not ln.startswith(("Traceback", "File ", "[bt]"))),
                         type(exc).__name__)
            raise click.ClickException(f"unexpected {type(exc).__name__}: {first[:300]} "
                                       "(set VGG_GLUON_DEBUG=1 for the traceback)") from None
    return wrapper


# ------------------------------------------------------------------------------------------------
# option groups, written once and shared by the commands
def _options(*opts):
    def deco(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return deco


def _choice(values):
    return click.Choice(values, case_sensitive=False)


data_options = _options(
    click.option("--dataset", type=_choice(DATASETS), help="Data set (default: fashion-mnist)."),
    click.option("--data-dir", type=click.Path(file_okay=False),
                 help="Where data sets are looked for and downloaded (default: $VGG_GLUON_DATA_DIR or ./data)."),
    click.option("--image-size", type=click.IntRange(min=32),
                 help="Resize each batch to N x N (>= 32; the tutorials use 96 or 224). Default: native 32."),
    click.option("--augment/--no-augment", default=None,
                 help="Random crop (4 px padding) and horizontal flip for training (cifar10 recipe: on)."),
    click.option("--val-split", type=click.FloatRange(0, 1, max_open=True),
                 help="Hold out this fraction of the training set for validation (picks 'best')."),
    click.option("--train-limit", type=click.IntRange(min=1), help="Use only the first N training images."),
    click.option("--test-limit", type=click.IntRange(min=1), help="Use only the first N test images."),
)

# Augmentation in detail (--augment is the classic crop 4 + random flip in one flag).
augment_options = _options(
    click.option("--augment-crop", type=click.IntRange(min=0),
                 help="Random crop of the image zero-padded by N px (translate by up to N; 0 = off)."),
    click.option("--augment-flip/--no-augment-flip", default=None, help="Random horizontal flip."),
    click.option("--alternate-flip/--no-alternate-flip", default=None,
                 help="Derandomized flip (airbench94): each image flipped the other way every other epoch."),
    click.option("--augment-cutout", type=click.IntRange(min=0),
                 help="Cutout: zero an N x N square at a random place (0 = off, the default)."),
)

model_options = _options(
    click.option("--arch", type=_choice(ARCHS), help="VGG configuration (A, B, D, E): default vgg11."),
    click.option("--width", type=float, help="Channel width multiplier (default 0.25: the tutorials' ratio 4)."),
    click.option("--batch-norm/--no-batch-norm", default=None, help="BatchNorm after every convolution."),
    click.option("--fc-units", type=int, help="Units of the two hidden dense layers (default 4096 x width)."),
    click.option("--dropout", type=float, help="Dropout after each hidden dense layer (default 0.5)."),
    click.option("--activation", type=_choice(ACTIVATIONS), help="relu (default) or gelu."),
    click.option("--bn-scale/--no-bn-scale", default=None,
                 help="BatchNorm learns a scale (default) or only its shift (airbench94: --no-bn-scale)."),
    click.option("--bn-momentum", type=float,
                 help="BatchNorm running-average momentum, Gluon's convention (default 0.9; airbench94: 0.4)."),
    click.option("--whiten/--no-whiten", default=None,
                 help="Initialize the 2x2 patch stem (fast3, fast3s) from the training data's patch "
                      "covariance, frozen (default off)."),
    click.option("--hybridize/--no-hybridize", default=None,
                 help="Compile the network (static_alloc, static_shape; several CPU contexts compile "
                      "without them, which race there). Default on."),
)

optim_options = _options(
    click.option("--epochs", type=int, help="Total epochs of the run."),
    click.option("--batch-size", type=int, help="Global batch size, split across devices (default 128)."),
    click.option("--optimizer", type=_choice(OPTIMIZERS), help="sgd, nag or adam (default sgd)."),
    click.option("--lr", type=float, help="Peak learning rate."),
    click.option("--lr-base-batch", type=click.IntRange(min=1),
                 help="--lr is per N images: the LR used is lr x batch-size / N (default: --lr as is)."),
    click.option("--bias-lr-mult", type=float, help="LR multiplier of BatchNorm and bias parameters (default 1)."),
    click.option("--no-wd-bias/--wd-bias", default=None,
                 help="No weight decay on BatchNorm and bias parameters (default: decayed like the rest)."),
    click.option("--lookahead/--no-lookahead", default=None,
                 help="Lookahead (airbench94): an EMA of the weights copied back every --lookahead-every steps."),
    click.option("--lookahead-every", type=click.IntRange(min=1), help="Steps between lookahead updates (default 5)."),
    click.option("--lookahead-decay", type=float, help="Lookahead per-step decay (default 0.95)."),
    click.option("--lookahead-start", type=float, help="Fraction of the run before lookahead starts (default 0.3)."),
    click.option("--eval-tta", type=_choice(TTA_MODES),
                 help="Test-time augmentation of the per-epoch evaluation: none (default), flip, flip-translate."),
    click.option("--momentum", type=float, help="Momentum for sgd/nag (default 0.9)."),
    click.option("--wd", type=float, help="Weight decay (default 5e-4)."),
    click.option("--lr-schedule", type=_choice(SCHEDULES),
                 help="constant, step, cosine or linear (per iteration; linear after a warmup = triangular)."),
    click.option("--warmup-epochs", type=float, help="Linear warmup from 0 over this many epochs."),
    click.option("--lr-steps", help="Epochs where the step schedule multiplies the LR by --lr-factor, e.g. 15,25."),
    click.option("--lr-factor", type=float, help="Step schedule factor (default 0.1)."),
    click.option("--label-smoothing", type=float, help="Label smoothing epsilon (default 0)."),
    click.option("--seed", type=int, help="Seed for initialization, data order and augmentation."),
    click.option("--dtype", type=_choice(DTYPES),
                 help="float16: half-precision weights and activations with float32 master weights "
                      "(multi_precision); for GPUs. Default float32."),
    click.option("--amp/--no-amp", default=None,
                 help="MXNet automatic mixed precision (float16 per operator, dynamic loss scaling); for GPUs."),
)

run_options = _options(
    click.option("--ctx", help="auto, cpu, gpu, gpu:0,1 or cpu:0,1 (default auto: all GPUs, else CPU)."),
    click.option("--kvstore", type=_choice(KVSTORES),
                 help="Gradient aggregation: device (default) or local in one process; dist_sync, "
                      "dist_device_sync or dist_async for workers of `vgg-gluon launch`."),
    click.option("--keep-last", type=int, help="Keep the newest N epoch checkpoints (the best one is always kept)."),
    click.option("--log-interval", type=int, help="Steps between progress-bar updates (default 20)."),
    click.option("-q", "--quiet", is_flag=True,
                 help="No progress bar and no per-epoch lines (train.log still written)."),
    click.option("--log-json", type=click.Path(dir_okay=False, allow_dash=True),
                 help="Append one JSON object per epoch (and one at the end) to FILE; '-' = stdout, "
                      "the human lines then go to stderr."),
)

_SETTING_KEYS = {"dataset", "data_dir", "image_size", "val_split", "train_limit", "test_limit", "arch", "width",
                 "batch_norm", "fc_units", "dropout", "hybridize", "epochs", "batch_size", "optimizer", "lr",
                 "momentum", "wd", "lr_schedule", "warmup_epochs", "lr_steps", "lr_factor", "label_smoothing",
                 "seed", "ctx", "kvstore", "keep_last", "log_interval", "output_dir", "run_name",
                 "dtype", "amp", "augment_crop", "augment_flip", "alternate_flip", "augment_cutout",
                 "activation", "bn_scale", "bn_momentum", "whiten", "lr_base_batch", "bias_lr_mult", "no_wd_bias",
                 "lookahead", "lookahead_every", "lookahead_decay", "lookahead_start", "eval_tta"}


def _flag_settings(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The RunConfig settings the user typed (None means not given)."""
    out = {k: v for k, v in kwargs.items() if k in _SETTING_KEYS and v is not None}
    if kwargs.get("augment") is not None:
        out.setdefault("augment_crop", 4 if kwargs["augment"] else 0)
        out.setdefault("augment_flip", bool(kwargs["augment"]))
    for k in ("dataset", "arch", "optimizer", "lr_schedule", "kvstore", "dtype", "activation", "eval_tta"):
        if k in out:
            out[k] = out[k].lower()
    return out


def resolve_config(config_path: Optional[str], flags: Dict[str, Any]) -> RunConfig:
    """defaults < data set recipe < --config YAML < flags."""
    from vgg_gluon.config import load_yaml
    yaml_values = load_yaml(Path(config_path)) if config_path else {}
    dataset = str(flags.get("dataset") or yaml_values.get("dataset") or RunConfig.dataset).lower()
    cfg = RunConfig()
    if dataset in DATASET_DEFAULTS:
        cfg.update(DATASET_DEFAULTS[dataset], "recipe")
    cfg.update(yaml_values, config_path or "config")
    cfg.update(flags, "command line")
    return cfg.validate()


# ------------------------------------------------------------------------------------------------
# console output
class Console:
    """Progress bar on a terminal, epoch lines on stdout and in RUN/train.log."""

    def __init__(self, quiet: bool, log_path: Optional[Path] = None):
        self.quiet = quiet
        self.log_path = log_path
        self.bar = None
        self.use_bar = not quiet and sys.stderr.isatty()
        # --log-json of the running command (train/resume): JSON lines for machines. A Console
        # without a train.log (e.g. a non-writing distributed rank) writes none.
        ctx = click.get_current_context(silent=True)
        self.json_path = ctx.params.get("log_json") if ctx is not None and log_path is not None else None
        self._epoch_t = time.time()  # wall time per epoch (training + evaluation + save) for the ETA
        self._epoch_walls: list = []

    def record(self, event: str, **fields: Any) -> None:
        """One JSON line (--log-json): {"event": "epoch", "epoch": 3, "test_acc": ..., ...}."""
        if not self.json_path:
            return
        clean = {k: (None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v)
                 for k, v in fields.items()}
        text = json.dumps({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **clean})
        if self.json_path == "-":
            self.close_bar()
            click.echo(text)
        else:
            with open(self.json_path, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def epoch(self, row: Dict[str, Any], epochs: int, is_best: bool) -> None:
        """The epoch line plus the run's ETA (mean wall time of the epochs seen x epochs left)."""
        now = time.time()
        self._epoch_walls.append(now - self._epoch_t)
        self._epoch_t = now
        left = epochs - int(row["epoch"])
        eta = sum(self._epoch_walls) / len(self._epoch_walls) * left if left > 0 else 0.0
        self.line(epoch_line(row, epochs, is_best) + (f"  eta {_duration(eta)}" if left > 0 else ""))
        self.record("epoch", **row, epochs=epochs, best=bool(is_best), eta_seconds=round(eta, 1))

    def line(self, text: str, err: bool = False) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
        if not self.quiet or err:
            self.close_bar()
            click.echo(text, err=err or self.json_path == "-")

    def progress(self, p) -> None:
        if not self.use_bar:
            return
        if self.bar is None or self.bar.desc != f"epoch {p.epoch}":
            from tqdm import tqdm
            self.close_bar()
            # initial: the bar starts at the first reading, so rate and ETA count only what it saw.
            self.bar = tqdm(total=p.steps, desc=f"epoch {p.epoch}", unit="step", leave=False,
                            dynamic_ncols=True, file=sys.stderr, initial=p.step)
        self.bar.update(p.step - self.bar.n)
        self.bar.set_postfix_str(f"loss {p.loss:.4f} acc {p.acc:.4f} {p.img_per_s:,.0f} img/s lr {p.lr:.4g}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 9 -> '9s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epoch_line(row: Dict[str, Any], epochs: int, is_best: bool) -> str:
    tta = f" (TTA {row['tta']})" if row.get("tta") else ""
    s = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
         f"test{tta} loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")
    if "val_acc" in row:
        s += f"  val acc {row['val_acc']:.4f}"
    s += f"  {row['seconds']:.1f}s {row['img_per_s']:,.0f} img/s  lr {row['lr']:.4g}"
    return s + ("  *best" if is_best else "")


class StopFlag:
    """SIGINT/SIGTERM set a flag the training loop checks after every step; a second signal
    while the checkpoint is being written is ignored so the save completes."""

    def __init__(self, console: Console):
        self.signum: Optional[int] = None
        self.console = console
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            self.console.line(f"{name}: finishing this step and saving a checkpoint...", err=True)
        else:
            self.console.line("still saving the checkpoint, please wait", err=True)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------
@click.group(cls=SuggestingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(vgg_gluon.__version__, "--version", prog_name="vgg-gluon")
@click.option("-v", "--verbose", is_flag=True, help="Log details (data sources, checkpoint decisions).")
def main(verbose: bool) -> None:
    """Train, resume and evaluate VGG classifiers (MXNet Gluon) on Fashion-MNIST and CIFAR-10.

    \b
    Examples:
      vgg-gluon train --dataset fashion-mnist --epochs 10
      vgg-gluon train --config experiments/cifar10.yaml --ctx gpu:0,1
      vgg-gluon resume checkpoints/<run> --epochs 40
      vgg-gluon evaluate checkpoints/<run> --which best --json
      vgg-gluon summary --arch vgg11 --width 0.25 --image-size 224
      vgg-gluon predict checkpoints/<run> shoe.png --top-k 3
      vgg-gluon runs

    Shell completion (bash): eval "$(_VGG_GLUON_COMPLETE=bash_source vgg-gluon)"
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")


def _new_run_dir(cfg: RunConfig) -> Path:
    parent = Path(cfg.output_dir)
    name = cfg.run_name or f"{cfg.dataset}-{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = parent / name
    if cfg.run_name is None:
        i = 1
        while run_dir.exists():
            i += 1
            run_dir = parent / f"{name}-{i}"
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already exists: resume it with `vgg-gluon resume {run_dir}` "
                          "or choose another --name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {run_dir} ({exc.strerror or exc}): "
                          "choose another --output-dir") from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"{run_dir}: not writable: choose another --output-dir")
    return run_dir


def _run_fit(session, run_dir: Path, console: Console, *, start_epoch: int, partial=None,
             best_acc: float = -1.0) -> None:
    """Train, print, and exit with the code that says how it ended."""
    from vgg_gluon import engine
    from vgg_gluon.runs import RunMarker
    from vgg_gluon.runtime import ctx_string
    cfg = session.cfg
    dist, rows = getattr(session, "dist", None), []
    if dist is not None and not dist.is_writer:
        console = Console(True)  # rank 0 alone prints, logs and draws the progress bar

    def on_epoch(row, best):
        rows.append(row)
        console.epoch(row, cfg.epochs, best)
    # The data's folder is named: a --data-dir without the files falls back to Debian's copy.
    ds = session.dataset
    console.line(f"run {run_dir}: {cfg.dataset} from {ds.source} ({len(ds.train.labels)} train / "
                 f"{len(ds.test.labels)} test), {cfg.arch} width {cfg.width:g}"
                 f"{' +BN' if cfg.batch_norm else ''}, input {tuple(session.input_shape)}, "
                 f"ctx {ctx_string(session.ctx_list)}, epochs {start_epoch + 1}..{cfg.epochs}")
    console.record("start", run=str(run_dir), first_epoch=start_epoch + 1, epochs=cfg.epochs,
                   config=cfg.to_dict())
    # RunMarker: RUN/.running.json while training (`vgg-gluon runs` tells running from crashed)
    with StopFlag(console) as stop, RunMarker(run_dir, active=dist is None or dist.is_writer):
        result = engine.fit(session, run_dir, start_epoch=start_epoch, partial=partial, best_acc=best_acc,
                            on_progress=console.progress, on_epoch=on_epoch,
                            should_stop=dist.stop_checker(stop) if dist else stop,
                            is_writer=dist is None or dist.is_writer)
    console.close_bar()
    console.record("end", status=result.status, epoch=result.epoch, best_acc=result.best_acc)
    if dist is not None:
        from vgg_gluon import distributed
        dist.dump_for_tests(session.net, rows)
        distributed.note_outcome(result.status, session)
    if result.status == "finished":
        if dist is None or dist.is_writer:
            from vgg_gluon.inspection import report_after_training_safely
            report_after_training_safely(session, run_dir, console.line)  # never raises
        console.line(f"done: best test accuracy {result.best_acc:.4f}; evaluate with "
                     f"`vgg-gluon evaluate {run_dir}`")
        return
    if result.status == "nonfinite":
        console.line(f"Error: {result.message}; last good checkpoint kept in {run_dir}", err=True)
        sys.exit(EXIT_NONFINITE)
    where = result.checkpoint.path if result.checkpoint else run_dir
    console.line(f"{result.message}; checkpoint {where}. Continue with `vgg-gluon resume {run_dir}`", err=True)
    sys.exit(EXIT_SIGTERM if stop.signum == signal.SIGTERM else EXIT_SIGINT)


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Recipe YAML (experiments/*.yaml); flags override it.")
@data_options
@augment_options
@model_options
@optim_options
@run_options
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Parent folder of run folders (default checkpoints).")
@click.option("--name", "run_name", help="Run folder name (default <dataset>-<arch>-<time>).")
@friendly_errors
def train(config_path, quiet, **kwargs):
    """Train a new run; every epoch commits a checkpoint to checkpoints/<run>/.

    \b
    Examples:
      vgg-gluon train --dataset fashion-mnist --arch vgg11 --width 0.25 --batch-norm --epochs 10
      vgg-gluon train --config experiments/cifar10.yaml --epochs 30 --ctx gpu:0,1
      vgg-gluon train --dataset cifar10 --train-limit 2000 --epochs 1   # a quick trial
    """
    cfg = resolve_config(config_path, _flag_settings(kwargs))
    from vgg_gluon import engine
    if cfg.kvstore.startswith("dist") and cfg.run_name is None:
        from vgg_gluon.distributed import default_run_name
        cfg.run_name = default_run_name(cfg)  # every worker must use the same run folder
    session = engine.build_session(cfg)
    if session.dist is not None and not session.dist.is_writer:  # rank 0 owns the run folder
        _run_fit(session, Path(cfg.output_dir) / cfg.run_name, Console(True), start_epoch=0)
        return
    run_dir = _new_run_dir(cfg)
    from vgg_gluon.checkpoint import atomic_write_text, run_lock
    with run_lock(run_dir):
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        _run_fit(session, run_dir, Console(quiet, run_dir / "train.log"), start_epoch=0)


@main.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--params", "params_path", type=click.Path(dir_okay=False),
              help="Start from a bare .params file (ours or a tutorial-style Gluon VGG) instead of a run.")
@click.option("--start-epoch", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --params: epochs already done (the LR schedule starts there).")
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="With --params: recipe YAML for the new run.")
@data_options
@augment_options
@model_options
@optim_options
@run_options
@click.option("--output-dir", type=click.Path(file_okay=False), help="With --params: parent folder of the new run.")
@click.option("--name", "run_name", help="With --params: name of the new run folder.")
@friendly_errors
def resume(run, params_path, start_epoch, config_path, quiet, **kwargs):
    """Continue a run exactly where it stopped (weights, momentum, LR schedule), or start a new
    run from a bare .params file.

    \b
    Examples:
      vgg-gluon resume checkpoints/<run>                 # after a crash or Ctrl-C
      vgg-gluon resume checkpoints/<run> --epochs 40     # same run, more epochs
      vgg-gluon resume --params TinyVGG11.params --dataset cifar10 --arch vgg11 --epochs 5
    """
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine
    flags = _flag_settings(kwargs)
    if bool(run) == bool(params_path):
        raise click.UsageError("give either a run folder or --params FILE")
    if params_path:
        if not Path(params_path).is_file():
            raise click.ClickException(f"{params_path}: no such file")
        cfg = resolve_config(config_path, _infer_from_params(params_path, flags))
        if start_epoch >= cfg.epochs:
            raise ConfigError(f"--start-epoch {start_epoch} leaves nothing to train with --epochs {cfg.epochs}")
        session = engine.build_session(cfg, params_source=Path(params_path))
        run_dir = _new_run_dir(cfg)
        atomic_write_text = ck.atomic_write_text
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        console = Console(quiet, run_dir / "train.log")
        console.line(session.foreign_report.message, err=True)  # shown even with --quiet
        # A fresh optimizer that has already "done" start_epoch epochs, so the schedule lines up.
        session.trainer._optimizer.num_update = start_epoch * len(session.train_loader)
        _run_fit(session, run_dir, console, start_epoch=start_epoch)
        return
    run_dir = Path(run)
    if config_path:
        raise click.UsageError("--config applies to --params; a run folder keeps its own config")
    refused = sorted(set(flags) - RESUME_OVERRIDABLE)
    if refused:
        allowed = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_OVERRIDABLE))
        raise click.UsageError(f"--{refused[0].replace('_', '-')} cannot change when resuming a run "
                               f"(allowed: {allowed})")
    if not run_dir.is_dir():
        raise click.ClickException(f"{run_dir}: no such run folder")
    # Workers of a distributed job (DMLC_ROLE set by `vgg-gluon launch`) all load the same run and
    # rank 0 alone writes; everywhere else one process at a time trains a run.
    with contextlib.nullcontext() if os.environ.get("DMLC_ROLE") else ck.run_lock(run_dir):
        _resume_run(run_dir, flags, quiet)


def _resume_run(run_dir: Path, flags: Dict[str, Any], quiet: bool) -> None:
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine, report
    ck.cleanup_temp(run_dir)
    if _never_checkpointed(run_dir):
        # Stopped (e.g. killed) inside epoch 1: nothing to load, but the run's settings are known.
        cfg = RunConfig.from_yaml(run_dir / "config.yaml").update(flags, "command line").validate()
        session = engine.build_session(cfg)
        console = Console(quiet, run_dir / "train.log")
        console.line(f"{run_dir} has no checkpoint yet (it stopped inside epoch 1): starting it again "
                     "from its config.yaml", err=True)
        _run_fit(session, run_dir, console, start_epoch=0)
        return
    c = ck.select_checkpoint(run_dir, "last")
    meta = c.meta()
    cfg = RunConfig.from_dict(meta["config"], f"{c.path}/meta.json").update(flags, "command line").validate()
    done = c.epoch
    if done >= cfg.epochs and not c.step:
        _recover_history(run_dir, report.read_history(run_dir / "history.csv"), done)
        click.echo(f"{run_dir}: already trained {done} of {cfg.epochs} epochs; pass --epochs N (> {done}) "
                   "to train more")
        return
    session = engine.build_session(cfg, params_source=c)
    from vgg_gluon.distributed import load_trainer_states  # dist_async: no momentum to restore
    load_trainer_states(session, c.file(ck.STATES))
    engine.restore_extras(session, c)
    got, want = int(session.trainer._optimizer.num_update), meta.get("num_update")
    if isinstance(want, int) and got != want:
        raise ck.CheckpointError(f"{c.file(ck.STATES)}: optimizer state is from update {got} but {c.name} was "
                                 f"saved at update {want} (a .states file from another checkpoint?)")
    if cfg.epochs != meta["config"]["epochs"] and (session.dist is None or session.dist.sync):
        # More (or fewer) epochs: the schedule is rebuilt for the new length at the same update count.
        # (dist_async: distributed.load_trainer_states already gave the servers the new schedule.)
        session.trainer._optimizer.lr_scheduler = engine.make_lr_scheduler(cfg, len(session.train_loader))
    session.history = _recover_history(run_dir, report.read_history(run_dir / "history.csv"), done)
    partial = engine.Partial(**meta["partial"]) if meta.get("partial") else None
    writer = session.dist is None or session.dist.is_writer  # every worker loads, rank 0 writes
    console = Console(quiet or not writer, run_dir / "train.log" if writer else None)
    console.line(f"resuming {run_dir} from {c.name}" + (f" (epoch {done + 1}, step {c.step})" if c.step else ""))
    if writer:
        ck.atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    _run_fit(session, run_dir, console, start_epoch=done, partial=partial,
             best_acc=float(meta.get("best_acc", -1.0)))


def _never_checkpointed(run_dir: Path) -> bool:
    """A run folder train created (config.yaml) that was stopped before its first checkpoint."""
    from vgg_gluon import checkpoint as ck
    return ((run_dir / "config.yaml").is_file() and not ck.list_checkpoints(run_dir)
            and not any((run_dir / f"{w}.json").exists() for w in ("last", "best"))
            and not any(ck.CKPT_RE.match(p.name) for p in run_dir.iterdir()))


def _recover_history(run_dir: Path, rows, done: int):
    """history.csv rows of epochs 1..done; a row lost by a kill between a checkpoint's commit and
    the history write is taken back from that checkpoint's meta.json."""
    from vgg_gluon import checkpoint as ck
    rows = [r for r in rows if r["epoch"] <= done]
    have, recovered = {r["epoch"] for r in rows}, False
    for c in ck.list_checkpoints(run_dir):
        if c.step or c.epoch > done or c.epoch in have:
            continue
        try:
            metrics = c.meta().get("metrics") or {}
        except ck.CheckpointError:
            continue
        if metrics.get("epoch") == c.epoch:
            rows.append(dict(metrics))
            have.add(c.epoch)
            recovered = True
    rows = sorted(rows, key=lambda r: r["epoch"])
    if recovered:
        from vgg_gluon import report
        report.write_history(run_dir / "history.csv", rows)
    return rows


def _infer_from_params(params_path: str, flags: Dict[str, Any]) -> Dict[str, Any]:
    """Fill width / BatchNorm / FC units the user did not give from the file's tensor shapes."""
    try:
        from vgg_gluon.foreign import infer_architecture
    except ImportError:
        return flags
    inferred = infer_architecture(Path(params_path))
    return {**{k: v for k, v in inferred.items() if k in ("width", "batch_norm", "fc_units")}, **flags}


@main.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--which", type=_choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
@click.option("--params", "params_path", type=click.Path(dir_okay=False),
              help="Evaluate a bare .params file (give --dataset and the architecture flags).")
@data_options
@model_options
@click.option("--batch-size", type=int, help="Evaluation batch size (default 256).")
@click.option("--ctx", help="auto, cpu, gpu, gpu:0,1 or cpu:0,1.")
@click.option("--tta", type=_choice(TTA_MODES), default=None,
              help="Test-time augmentation: none, flip (image + mirror), flip-translate (also shifted 1 px; "
                   "airbench94). Default: the run's --eval-tta, else none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@friendly_errors
def evaluate(run, which, params_path, as_json, tta, **kwargs):
    """Accuracy, loss, per-class accuracy and confusion matrix on the test set.

    \b
    Examples:
      vgg-gluon evaluate checkpoints/<run>
      vgg-gluon evaluate checkpoints/<run> --which last --json
      vgg-gluon evaluate --params TinyVGG11.params --dataset cifar10 --arch vgg11
    """
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine
    flags = _flag_settings(kwargs)
    if bool(run) == bool(params_path):
        raise click.UsageError("give either a run folder or --params FILE")
    if run:
        c = ck.select_checkpoint(Path(run), which.lower())
        meta = c.meta()
        keep = {k: v for k, v in flags.items() if k in ("data_dir", "ctx", "batch_size", "test_limit")}
        cfg = RunConfig.from_dict(meta["config"], f"{c.path}/meta.json").update(keep).validate()
        source, epoch = c, c.epoch
    else:
        if not Path(params_path).is_file():
            raise click.ClickException(f"{params_path}: no such file")
        cfg = resolve_config(None, _infer_from_params(params_path, flags))
        source, epoch = Path(params_path), None
    session = engine.build_session(cfg, train=False, params_source=source)
    tta = (tta or cfg.eval_tta).lower()
    result = engine.evaluate(session.net, session.eval_loader, session.num_classes, tta=tta)
    classes = list(session.dataset.classes)
    out = {"source": str(source.path if hasattr(source, "path") else source), "epoch": epoch,
           "dataset": cfg.dataset, "arch": cfg.arch, "tta": tta, "accuracy": result["acc"], "loss": result["loss"],
           "samples": result["samples"], "img_per_s": result["img_per_s"], "classes": classes,
           "per_class_accuracy": dict(zip(classes, result["per_class_acc"])), "confusion": result["confusion"]}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{out['source']}" + (f" (epoch {epoch})" if epoch is not None else ""))
    click.echo(f"{cfg.dataset} test ({'no TTA' if tta == 'none' else 'TTA ' + tta}): accuracy {result['acc']:.4f}  "
               f"loss {result['loss']:.4f}  "
               f"{result['samples']} images  {result['img_per_s']:,.0f} img/s")
    click.echo("\nper-class accuracy:")
    width = max(len(c) for c in classes)
    for name, acc in zip(classes, result["per_class_acc"]):
        click.echo(f"  {name:<{width}}  {acc:.4f}")
    click.echo("\nconfusion matrix (rows: true class, columns: predicted):")
    click.echo("  " + " " * width + "".join(f"{i:>6}" for i in range(len(classes))))
    for i, (name, row) in enumerate(zip(classes, result["confusion"])):
        click.echo(f"  {name:<{width}}" + "".join(f"{v:>6}" for v in row) + f"   ({i})")


@main.command("data")
@click.argument("dataset", type=_choice(DATASETS))
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Target folder (default $VGG_GLUON_DATA_DIR or ./data).")
@click.option("--from-archive", type=click.Path(exists=True, dir_okay=False),
              help="Unpack a local archive (image folders or the official binary tar) instead of downloading.")
@click.option("--no-download", is_flag=True, help="Never use the network.")
@friendly_errors
def data_cmd(dataset, data_dir, from_archive, no_download):
    """Make a data set available offline (unpack an archive, or download and verify it).

    \b
    Examples:
      vgg-gluon data cifar10 --from-archive ../shared/datasets/cifar10-jpeg.tar.gz
      vgg-gluon data fashion-mnist
    """
    from vgg_gluon import data as data_mod
    target = Path(data_dir) if data_dir else data_mod.default_data_dir()
    click.echo(data_mod.prepare_dataset(dataset.lower(), target, Path(from_archive) if from_archive else None,
                                        download=not no_download))


# summary, predict, export, report, runs: registered on `main` by importing their module.
from vgg_gluon import cli_tools  # noqa: E402,F401
from vgg_gluon.launch import launch_cmd  # noqa: E402  (no mxnet import: the launcher stays light)

main.add_command(launch_cmd)

if __name__ == "__main__":
    main()
