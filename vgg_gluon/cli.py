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
    ARCHS,
    DATASETS,
    DTYPES,
    KVSTORES,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    ConfigError,
    RunConfig,
    SettingError,
)
from vgg_gluon.errors import EXIT_NONFINITE, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, UserError, mxnet_error_reason

log = logging.getLogger("vgg_gluon")


# Settings that may change when a run is resumed; the others define the run.
RESUME_OVERRIDABLE = {"epochs", "ctx", "kvstore", "data_dir", "keep_last", "log_interval"}


# ------------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, no traceback
class BadUsage(click.ClickException):
    """Bad usage in one line (`Error: Invalid value for '--width': ...`), exit 2 like click's own checks."""
    exit_code = EXIT_USAGE


# Options whose name is not the setting's name with dashes.
_OPTION_NAMES = {"run_name": "--name", "augment_crop": "--augment", "augment_flip": "--augment",
                 "config_path": "--config"}


def option_name(field: str) -> str:
    """The command-line option of a RunConfig field: lr_steps -> --lr-steps, run_name -> --name."""
    return _OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def usage_error(exc: ConfigError, typed=()) -> click.ClickException:
    """A problem with a value the user typed: exit 2, naming the option as typed."""
    if not isinstance(exc, SettingError):
        return BadUsage(str(exc))
    if exc.field in typed or not typed:
        return BadUsage(f"Invalid value for '{option_name(exc.field)}': {exc.detail}")
    # A combination: the typed option made another setting invalid (--epochs 1 under warmup 3).
    other = next(f for f in exc.fields if f in typed)
    return BadUsage(f"Invalid value for '{option_name(other)}': {exc.field} {exc.detail}")


def apply_flags(cfg: RunConfig, flags: Dict[str, Any], earlier: str = "the recipe") -> RunConfig:
    """cfg < flags, validated. A problem with a typed value is bad usage (exit 2); one with a value
    from a file (a recipe, a run's config) stays an input problem (exit 1) naming its source."""
    if flags.get("data_dir") is not None and not Path(flags["data_dir"]).expanduser().is_dir():
        # Never trained on another copy behind the user's back (Debian's, say) while config.yaml
        # records the folder they named.
        raise BadUsage(f"Invalid value for '--data-dir': {flags['data_dir']}: no such folder "
                       "(create it first to download the data set into it)")
    try:
        cfg.update(flags, "command line")
    except ConfigError as exc:
        raise usage_error(exc) from None
    try:
        return cfg.validate()
    except ConfigError as exc:
        if set(exc.fields) & set(flags):
            raise usage_error(exc, set(flags)) from None
        if isinstance(exc, SettingError) and exc.source is None:
            exc.source = earlier
        raise


def friendly_errors(fn):
    """Turn known problems into `Error: <one line>` with exit 1 (never a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # `vgg-gluon evaluate RUN | head -2`: the reader has what it wanted. Later writes (and
            # the flush at exit) go to /dev/null instead of failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except SettingError as exc:
            # A typed value, or a combination with one (--batch-size 1 --ctx cpu:0,1), is bad usage.
            typed = set(_flag_settings(kwargs))
            if exc.source == "command line" or set(exc.fields) & typed:
                raise usage_error(exc, typed) from None
            raise click.ClickException(str(exc)) from None
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
            if isinstance(exc, UserError):
                raise click.ClickException(str(exc)) from None
            from vgg_gluon.runtime import explain_mxnet_error
            advice = explain_mxnet_error(exc)
            if advice:
                raise click.ClickException(advice) from None
            if os.environ.get("VGG_GLUON_DEBUG"):
                raise
            first = mxnet_error_reason(exc)
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

model_options = _options(
    click.option("--arch", type=_choice(ARCHS), help="VGG configuration (A, B, D, E): default vgg11."),
    click.option("--width", type=float, help="Channel width multiplier (default 0.25: the tutorials' ratio 4)."),
    click.option("--batch-norm/--no-batch-norm", default=None, help="BatchNorm after every convolution."),
    click.option("--fc-units", type=int, help="Units of the two hidden dense layers (default 4096 x width)."),
    click.option("--dropout", type=float, help="Dropout after each hidden dense layer (default 0.5)."),
    click.option("--hybridize/--no-hybridize", default=None,
                 help="Compile the network (static_alloc, static_shape; several CPU contexts compile "
                      "without them, which race there). Default on."),
)

optim_options = _options(
    click.option("--epochs", type=int, help="Total epochs of the run."),
    click.option("--batch-size", type=int, help="Global batch size, split across devices (default 128)."),
    click.option("--optimizer", type=_choice(OPTIMIZERS), help="sgd, nag or adam (default sgd)."),
    click.option("--lr", type=float, help="Peak learning rate."),
    click.option("--momentum", type=float, help="Momentum for sgd/nag (default 0.9)."),
    click.option("--wd", type=float, help="Weight decay (default 5e-4)."),
    click.option("--lr-schedule", type=_choice(SCHEDULES), help="constant, step or cosine (per iteration)."),
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
    click.option("--tensorboard", type=click.Path(file_okay=False),
                 help="Write TensorBoard event files into DIR: scalars per step and epoch, the network graph, "
                      "the mistakes grid (tensorboard --logdir DIR shows them)."),
    click.option("--log-json", type=click.Path(dir_okay=False, allow_dash=True),
                 help="Append one JSON object per epoch (and one at the end) to FILE; '-' = stdout, "
                      "the human lines then go to stderr."),
)

_SETTING_KEYS = {"dataset", "data_dir", "image_size", "val_split", "train_limit", "test_limit", "arch", "width",
                 "batch_norm", "fc_units", "dropout", "hybridize", "epochs", "batch_size", "optimizer", "lr",
                 "momentum", "wd", "lr_schedule", "warmup_epochs", "lr_steps", "lr_factor", "label_smoothing",
                 "seed", "ctx", "kvstore", "keep_last", "log_interval", "output_dir", "run_name",
                 "dtype", "amp"}


def _flag_settings(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The RunConfig settings the user typed (None means not given)."""
    out = {k: v for k, v in kwargs.items() if k in _SETTING_KEYS and v is not None}
    if kwargs.get("augment") is not None:
        out["augment_crop"] = 4 if kwargs["augment"] else 0
        out["augment_flip"] = bool(kwargs["augment"])
    for k in ("dataset", "arch", "optimizer", "lr_schedule", "kvstore", "dtype"):
        if k in out:
            out[k] = out[k].lower()
    return out


def resolve_config(config_path: Optional[str], flags: Dict[str, Any]) -> RunConfig:
    """defaults < the data set's recipe (config.RECIPES) < --config YAML < flags."""
    from vgg_gluon.config import load_yaml
    yaml_values = load_yaml(Path(config_path)) if config_path else {}
    dataset = str(flags.get("dataset") or yaml_values.get("dataset") or RunConfig.dataset).lower()
    cfg = RunConfig()
    if dataset in RECIPES:
        cfg.update(RECIPES[dataset], "recipe")
    cfg.update(yaml_values, config_path or "config")
    if "epochs" in flags and "warmup_epochs" not in flags and flags["epochs"] > 0 \
            and cfg.warmup_epochs >= flags["epochs"]:
        # A quick trial (`--epochs 1`) of a recipe with a longer warmup keeps the warmup's share of
        # the run rather than refusing a setting the user never typed.
        cfg.warmup_epochs = cfg.warmup_epochs * flags["epochs"] / cfg.epochs
    return apply_flags(cfg, flags, earlier=config_path or f"the {dataset} recipe")


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
        self.tb = None   # --tensorboard DIR: the same readings as TensorBoard scalars
        tb_dir = ctx.params.get("tensorboard") if ctx is not None and log_path is not None else None
        if tb_dir:
            from vgg_gluon.tensorboard import TensorBoardLog
            self.tb = TensorBoardLog(Path(tb_dir))
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
        if self.tb is not None:
            self.tb.epoch(row)
        self.record("epoch", **row, epochs=epochs, best=bool(is_best), eta_seconds=round(eta, 1))

    def line(self, text: str, err: bool = False) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
        if not self.quiet or err:
            self.close_bar()
            click.echo(text, err=err or self.json_path == "-")

    def progress(self, p) -> None:
        if self.tb is not None:
            self.tb.progress(p)
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
    s = (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
         f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")
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
    from vgg_gluon.testhooks import install_from_env
    install_from_env()   # test-only seams, when their variables are set


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


def done_line(o: Dict[str, Any]) -> str:
    """The last line of a finished run: every figure names its split."""
    text = f"done: last epoch ({o['last_epoch']}) test accuracy {o['last_test_acc']:.4f}"
    if o["best_epoch"] is None:
        return text
    if o["best_split"] == "val":
        return text + (f"; best epoch {o['best_epoch']} by validation accuracy {o['best_acc']:.4f} "
                       f"(test accuracy {o['best_test_acc']:.4f})")
    return text + f"; best epoch {o['best_epoch']} by test accuracy {o['best_acc']:.4f} (chosen on the test set)"


def _run_fit(session, run_dir: Path, console: Console, *, start_epoch: int, partial=None,
             best_acc: float = -1.0) -> None:
    """Train, print, and exit with the code that says how it ended."""
    from vgg_gluon import engine, report
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
                 f"{' +BN' if cfg.batch_norm else ''} fc {session.net.fc_units}, input {tuple(session.input_shape)}, "
                 f"ctx {ctx_string(session.ctx_list)}, epochs {start_epoch + 1}..{cfg.epochs}")
    if console.tb is not None:
        console.tb.graph(session.net, session.input_shape)
    if session.val_loader is None:
        console.line("note: no --val-split, so the 'best' checkpoint is chosen on test accuracy (optimistic); "
                     "the last epoch's test accuracy is the fair figure")
    console.record("start", run=str(run_dir), first_epoch=start_epoch + 1, epochs=cfg.epochs,
                   config=cfg.to_dict())
    # RunMarker: RUN/.running.json while training (`vgg-gluon runs` tells running from crashed)
    with StopFlag(console) as stop, RunMarker(run_dir, active=dist is None or dist.is_writer):
        result = engine.fit(session, run_dir, start_epoch=start_epoch, partial=partial, best_acc=best_acc,
                            on_progress=console.progress, on_epoch=on_epoch,
                            should_stop=dist.stop_checker(stop) if dist else stop,
                            is_writer=dist is None or dist.is_writer)
    console.close_bar()
    if console.tb is not None:
        console.tb.writer.flush()   # a stopped run exits below; what it logged is on disk
    outcome = report.best_summary(session.history if session.history else rows)
    console.record("end", status=result.status, epoch=result.epoch, **outcome)
    if dist is not None:
        from vgg_gluon import distributed
        distributed.note_outcome(result.status, session)
    if result.status == "finished":
        if dist is None or dist.is_writer:
            from vgg_gluon.inspection import report_after_training_safely
            report_after_training_safely(session, run_dir, console.line)  # never raises
            if console.tb is not None and (run_dir / "mistakes.png").is_file():
                console.tb.image("mistakes", run_dir / "mistakes.png", result.epoch)
        if console.tb is not None:
            console.tb.close()
        console.line(done_line(outcome) + f"; evaluate with `vgg-gluon evaluate {run_dir}`")
        return
    if result.status == "nonfinite":
        console.line(f"Error: {result.message}; last good checkpoint kept in {run_dir}", err=True)
        sys.exit(EXIT_NONFINITE)
    if dist is None or dist.is_writer:   # rank 0 wrote the checkpoint and says where it is
        where = result.checkpoint.path if result.checkpoint else run_dir
        console.line(f"{result.message}; checkpoint {where}. {resume_hint(run_dir, dist)}", err=True)
    sys.exit(EXIT_SIGTERM if stop.signum == signal.SIGTERM else EXIT_SIGINT)


def resume_hint(run_dir: Path, dist=None) -> str:
    """The command that continues a stopped run: a distributed one goes back through the launcher
    (a bare `resume` of a dist_* run has no parameter server to join)."""
    if dist is None:
        return f"Continue with `vgg-gluon resume {run_dir}`"
    servers = os.environ.get("DMLC_NUM_SERVER", "1")
    launch = f"vgg-gluon launch -n {dist.num_workers}" + (f" -s {servers}" if servers != "1" else "")
    return (f"Continue with `{launch} -- resume {run_dir}` "
            f"(or in one process: `vgg-gluon resume {run_dir} --kvstore device`)")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Recipe YAML (experiments/*.yaml); flags override it.")
@data_options
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
        cfg = resolve_config(config_path, _infer_from_params(params_path, flags, say=True))
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
        cfg = apply_flags(RunConfig.from_yaml(run_dir / "config.yaml"), flags, f"{run_dir}/config.yaml")
        session = engine.build_session(cfg)
        console = Console(quiet, run_dir / "train.log")
        console.line(f"{run_dir} has no checkpoint yet (it stopped inside epoch 1): starting it again "
                     "from its config.yaml", err=True)
        _run_fit(session, run_dir, console, start_epoch=0)
        return
    c = ck.select_checkpoint(run_dir, "last")
    meta = c.meta()
    cfg = apply_flags(RunConfig.from_dict(meta["config"], f"{c.path}/meta.json"), flags, f"{c.path}/meta.json")
    done = c.epoch
    if done >= cfg.epochs:
        # Nothing to train. A run stopped inside epoch done + 1 keeps that checkpoint and its
        # settings: `--epochs N` below it must not "finish" the run by dropping the stopped epoch.
        _recover_history(run_dir, report.read_history(run_dir / "history.csv"), done)
        stopped = f" (epoch {done + 1} was stopped at step {c.step})" if c.step else ""
        click.echo(f"{run_dir}: already trained {done} of {cfg.epochs} epochs{stopped}; pass --epochs N "
                   f"(> {done}) to train more")
        return
    session = engine.build_session(cfg, params_source=c)
    from vgg_gluon.distributed import load_trainer_states  # dist_async: no momentum to restore
    load_trainer_states(session, c.file(ck.STATES))
    got, want = int(session.trainer._optimizer.num_update), meta.get("num_update")
    if isinstance(want, int) and got != want:
        raise ck.CheckpointError(f"{c.file(ck.STATES)}: optimizer state is from update {got} but {c.name} was "
                                 f"saved at update {want} (a .states file from another checkpoint?)")
    if session.dist is None or session.dist.sync:
        # The schedule is always rebuilt from the settings at the same update count: for a new
        # --epochs, and so that a schedule pickled by an older version is not trusted.
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


def _infer_from_params(params_path: str, flags: Dict[str, Any], say: bool = False) -> Dict[str, Any]:
    """Fill width / BatchNorm / FC units the user did not give from the file's tensor shapes; with
    `say`, one line on stderr names what was read from the file."""
    from vgg_gluon.foreign import infer_architecture
    inferred = infer_architecture(Path(params_path))
    used = {k: v for k, v in inferred.items() if k in ("width", "batch_norm", "fc_units") and k not in flags}
    if say and used:
        words = {"width": lambda v: f"width {v:g}", "batch_norm": lambda v: "BatchNorm" if v else "no BatchNorm",
                 "fc_units": lambda v: f"fc {v}"}
        click.echo(f"{params_path}: inferred " + ", ".join(words[k](v) for k, v in used.items())
                   + " from the file's shapes", err=True)
    return {**used, **flags}


# evaluate: the data and model options that make sense for a bare .params file
eval_data_options = _options(
    click.option("--dataset", type=_choice(DATASETS), help="With --params: the data set (default: fashion-mnist)."),
    click.option("--data-dir", type=click.Path(file_okay=False),
                 help="Where data sets are looked for (default: $VGG_GLUON_DATA_DIR or ./data)."),
    click.option("--image-size", type=click.IntRange(min=32), help="With --params: input size (default native 32)."),
    click.option("--test-limit", type=click.IntRange(min=1), help="Evaluate only the first N test images."),
)
eval_model_options = _options(
    click.option("--arch", type=_choice(ARCHS), help="With --params: VGG configuration (inferred from the file)."),
    click.option("--width", type=float, help="With --params: channel width multiplier (inferred from the file)."),
    click.option("--batch-norm/--no-batch-norm", default=None, help="With --params: BatchNorm (inferred)."),
    click.option("--fc-units", type=int, help="With --params: hidden dense units (inferred from the file)."),
)
# What `evaluate RUN` may change; everything else is the run's own setting.
EVALUATE_RUN_OVERRIDABLE = {"data_dir", "ctx", "batch_size", "test_limit"}


@main.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--which", type=_choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
@click.option("--params", "params_path", type=click.Path(dir_okay=False),
              help="Evaluate a bare .params file (give --dataset; the architecture is read from the file).")
@eval_data_options
@eval_model_options
@click.option("--batch-size", type=click.IntRange(min=1), help="Evaluation batch size (default 256).")
@click.option("--ctx", help="auto, cpu, gpu, gpu:0,1 or cpu:0,1.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@friendly_errors
def evaluate(run, which, params_path, as_json, **kwargs):
    """Accuracy (top-1, top-5), loss, per-class accuracy and confusion matrix on the test set.

    \b
    Examples:
      vgg-gluon evaluate checkpoints/<run>
      vgg-gluon evaluate checkpoints/<run> --which last --json
      vgg-gluon evaluate --params TinyVGG11.params --dataset cifar10 --arch vgg11
    """
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import data as data_mod
    from vgg_gluon import engine
    flags = _flag_settings(kwargs)
    if bool(run) == bool(params_path):
        raise click.UsageError("give either a run folder or --params FILE")
    dataset = None
    if run:
        refused = sorted(set(flags) - EVALUATE_RUN_OVERRIDABLE)
        if refused:
            raise BadUsage(f"{option_name(refused[0])} applies to --params FILE: a run folder is evaluated with "
                           f"its own settings (allowed with a run: "
                           f"{', '.join(option_name(k) for k in sorted(EVALUATE_RUN_OVERRIDABLE))})")
        c = ck.select_checkpoint(Path(run), which.lower())
        meta = c.meta()
        cfg = apply_flags(RunConfig.from_dict(meta["config"], f"{c.path}/meta.json"), flags, f"{c.path}/meta.json")
        prep = meta.get("preprocessing") or {}
        if prep.get("mean") and prep.get("std") and not cfg.val_split:
            # The run's own normalization: the training split need not be read at all.
            dataset = data_mod.load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None,
                                            test_limit=cfg.test_limit, stats=(prep["mean"], prep["std"]))
        source, epoch = c, c.epoch
    else:
        if not Path(params_path).is_file():
            raise click.ClickException(f"{params_path}: no such file")
        cfg = resolve_config(None, _infer_from_params(params_path, flags, say=True))
        source, epoch = Path(params_path), None
    session = engine.build_session(cfg, train=False, params_source=source, dataset=dataset,
                                   eval_batch_size=flags.get("batch_size", 256))
    if params_path:
        click.echo(session.foreign_report.message, err=True)
    result = engine.evaluate(session.net, session.eval_loader, session.num_classes)
    print_evaluation(source, epoch, cfg, result, list(session.dataset.classes), as_json)


def print_evaluation(source, epoch, cfg: RunConfig, result: Dict[str, Any], classes, as_json: bool) -> None:
    """The evaluate command's table or JSON object."""
    counts = [int(sum(row)) for row in result["confusion"]]
    out = {"source": str(source.path if hasattr(source, "path") else source), "epoch": epoch, "split": "test",
           "dataset": cfg.dataset, "arch": cfg.arch, "accuracy": result["acc"], "top5_accuracy": result["top5_acc"],
           "top_k": result["top_k"], "loss": result["loss"], "samples": result["samples"],
           "img_per_s": result["img_per_s"], "classes": classes,
           "per_class_accuracy": dict(zip(classes, result["per_class_acc"])),
           "per_class_count": dict(zip(classes, counts)), "confusion": result["confusion"]}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{out['source']}" + (f" (epoch {epoch})" if epoch is not None else ""))
    click.echo(f"{cfg.dataset} test: accuracy {result['acc']:.4f}  top-{result['top_k']} {result['top5_acc']:.4f}  "
               f"loss {result['loss']:.4f}  {result['samples']} images  {result['img_per_s']:,.0f} img/s")
    click.echo("\nper-class accuracy:")
    width = max(len(c) for c in classes)
    for name, acc, n in zip(classes, result["per_class_acc"], counts):
        click.echo(f"  {name:<{width}}  {acc:.4f}  ({n} images)")
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
