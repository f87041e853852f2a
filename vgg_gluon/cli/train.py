"""The training commands: train, resume, evaluate and data. They parse, ask `run` and `engine`
to do the work, print, and exit with the code that says how it ended."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import click

from vgg_gluon import checkpoint as ck
from vgg_gluon import run
from vgg_gluon.cli.common import friendly_errors
from vgg_gluon.cli.console import Console, StopFlag, done_line, resume_hint
from vgg_gluon.cli.group import command
from vgg_gluon.cli.options import (
    BadUsage,
    apply_flags,
    choice,
    combine,
    data_options,
    flag_settings,
    model_options,
    optim_options,
    option_name,
    resolve_config,
    run_options,
    setting_option,
)
from vgg_gluon.config import DATASETS, TTA_MODES, RunConfig
from vgg_gluon.errors import EXIT_NONFINITE, EXIT_SIGINT, EXIT_SIGTERM

settings_options = combine(data_options, model_options, optim_options, run_options)
folder_options = combine(setting_option("output_dir"), setting_option("run_name"))
# evaluate: the data and model options that make sense for a bare .params file
eval_options = combine(
    setting_option("dataset", help="With --params: the data set (default: fashion-mnist)."),
    setting_option("data_dir"),
    setting_option("image_size", help="With --params: input size (default: the native 32 px)."),
    setting_option("test_limit", help="Evaluate only the first N test images."),
    setting_option("arch", help="With --params: VGG configuration (inferred from the file)."),
    setting_option("width", help="With --params: channel width multiplier (inferred from the file)."),
    setting_option("batch_norm", help="With --params: BatchNorm (inferred from the file)."),
    setting_option("fc_units", help="With --params: hidden dense units (inferred from the file)."),
    setting_option("batch_size", help="Evaluation batch size (default 256)."),
    setting_option("ctx"),
)
# What `evaluate RUN` may change; everything else is the run's own setting.
EVALUATE_RUN_OVERRIDABLE = {"data_dir", "ctx", "batch_size", "test_limit"}


@command()
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Recipe YAML (experiments/*.yaml); flags override it.")
@settings_options
@folder_options
@friendly_errors
def train(config_path, quiet, **kwargs):
    """Train a new run; every epoch commits a checkpoint to checkpoints/<run>/.

    \b
    Examples:
      vgg-gluon train --dataset fashion-mnist --arch vgg11 --width 0.25 --batch-norm --epochs 10
      vgg-gluon train --config experiments/cifar10.yaml --epochs 30 --ctx gpu:0,1
      vgg-gluon train --dataset cifar10 --train-limit 2000 --epochs 1   # a quick trial
    """
    cfg = resolve_config(config_path, flag_settings(kwargs))
    from vgg_gluon import engine
    if cfg.kvstore.startswith("dist") and cfg.run_name is None:
        from vgg_gluon.distributed import default_run_name
        cfg.run_name = default_run_name(cfg)  # every worker must use the same run folder
    session = engine.build_session(cfg)
    if not session.is_writer:  # rank 0 owns the run folder
        _run_fit(session, Path(cfg.output_dir) / cfg.run_name, Console(True), start_epoch=0)
        return
    run_dir = run.new_run_dir(cfg)
    with ck.run_lock(run_dir):
        run.write_config(run_dir, cfg)
        _run_fit(session, run_dir, Console(quiet, run_dir / "train.log"), start_epoch=0)


@command()
@click.argument("run_dir", metavar="RUN", required=False, type=click.Path(file_okay=False))
@click.option("--params", "params_path", type=click.Path(dir_okay=False),
              help="Start from a bare .params file (ours or a tutorial-style Gluon VGG) instead of a run.")
@click.option("--start-epoch", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --params: epochs already done (the LR schedule starts there).")
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="With --params: recipe YAML for the new run.")
@settings_options
@setting_option("output_dir", help="With --params: parent folder of the new run.")
@setting_option("run_name", help="With --params: name of the new run folder.")
@friendly_errors
def resume(run_dir, params_path, start_epoch, config_path, quiet, **kwargs):
    """Continue a run exactly where it stopped (weights, momentum, LR schedule), or start a new
    run from a bare .params file.

    \b
    Examples:
      vgg-gluon resume checkpoints/<run>                 # after a crash or Ctrl-C
      vgg-gluon resume checkpoints/<run> --epochs 40     # same run, more epochs
      vgg-gluon resume --params TinyVGG11.params --dataset cifar10 --arch vgg11 --epochs 5
    """
    flags = flag_settings(kwargs)
    if bool(run_dir) == bool(params_path):
        raise click.UsageError("give either a run folder or --params FILE")
    if params_path:
        _resume_from_params(Path(params_path), start_epoch, config_path, flags, quiet)
        return
    run_dir = Path(run_dir)
    if config_path:
        raise click.UsageError("--config applies to --params; a run folder keeps its own config")
    refused = run.config_override_refused(flags)
    if refused:
        allowed = ", ".join(option_name(k) for k in sorted(run.RESUME_OVERRIDABLE))
        raise click.UsageError(f"{option_name(refused)} cannot change when resuming a run (allowed: {allowed})")
    if not run_dir.is_dir():
        raise click.ClickException(f"{run_dir}: no such run folder")
    # Workers of a distributed job (DMLC_ROLE set by `vgg-gluon launch`) all load the same run and
    # rank 0 alone writes; everywhere else one process at a time trains a run.
    with contextlib.nullcontext() if os.environ.get("DMLC_ROLE") else ck.run_lock(run_dir):
        r = run.resume_run(run_dir, lambda cfg, source: apply_flags(cfg, flags, source))
        if r.session is None:
            click.echo(r.note)
            return
        writer = r.session.is_writer   # every worker loads, rank 0 writes
        console = Console(quiet or not writer, run_dir / "train.log" if writer else None, silent=not writer)
        console.line(r.note, err=r.fresh)   # a restart from config.yaml is said even with --quiet
        if writer:
            run.write_config(run_dir, r.session.cfg)
        _run_fit(r.session, run_dir, console, start_epoch=r.start_epoch, partial=r.partial, best_acc=r.best_acc)


def _resume_from_params(params_path: Path, start_epoch: int, config_path, flags, quiet: bool) -> None:
    """`resume --params FILE`: a new run whose weights come from a bare .params file."""
    from vgg_gluon import engine
    if not params_path.is_file():
        raise click.ClickException(f"{params_path}: no such file")
    cfg = resolve_config(config_path, _infer_from_params(params_path, flags, say=True))
    if start_epoch >= cfg.epochs:
        raise BadUsage(f"--start-epoch {start_epoch} leaves nothing to train with --epochs {cfg.epochs}")
    session = engine.build_session(cfg, params_source=params_path)
    run_dir = run.new_run_dir(cfg)
    with ck.run_lock(run_dir):
        run.write_config(run_dir, cfg)
        console = Console(quiet, run_dir / "train.log")
        console.line(session.foreign_report.message, err=True)  # shown even with --quiet
        run.start_from_params(session, start_epoch)
        _run_fit(session, run_dir, console, start_epoch=start_epoch)


def _run_fit(session, run_dir: Path, console: Console, *, start_epoch: int, partial=None,
             best_acc: float = -1.0) -> None:
    """Train, print, and exit with the code that says how it ended."""
    from vgg_gluon import engine, report
    from vgg_gluon.runs import RunMarker
    cfg, dist, rows = session.cfg, session.dist, []
    if not session.is_writer:
        console = Console(True, silent=True)  # rank 0 alone prints, logs and draws the progress bar

    def on_epoch(row, best):
        rows.append(row)
        console.epoch(row, cfg.epochs, best)
    _announce(session, run_dir, console, start_epoch)
    # RunMarker: RUN/.running.json while training (`vgg-gluon runs` tells running from crashed)
    with StopFlag(console) as stop, RunMarker(run_dir, active=session.is_writer):
        result = engine.fit(session, run_dir, start_epoch=start_epoch, partial=partial, best_acc=best_acc,
                            on_progress=console.progress, on_epoch=on_epoch,
                            should_stop=dist.stop_checker(stop) if dist else stop)
    console.close_bar()
    if console.tb is not None:
        console.tb.writer.flush()   # a stopped run exits below; what it logged is on disk
    outcome = report.best_summary(session.history if session.history else rows)
    console.record("end", status=result.status, epoch=result.epoch, **outcome)
    if dist is not None:
        from vgg_gluon import distributed
        distributed.note_outcome(result.status, session)
    if result.status == "finished":
        _finish(session, run_dir, console, result, outcome)
        return
    if result.status == "nonfinite":
        console.line(f"Error: {result.message}; last good checkpoint kept in {run_dir}", err=True)
        sys.exit(EXIT_NONFINITE)
    where = result.checkpoint.path if result.checkpoint else run_dir
    console.line(f"{result.message}; checkpoint {where}. {resume_hint(run_dir, dist)}", err=True)
    sys.exit(EXIT_SIGTERM if stop.signum == signal.SIGTERM else EXIT_SIGINT)


def _cpu_threads(ctx_list) -> str:
    """' (2 threads)' for CPU runs: the OpenMP team size vgg_gluon._env chose from the idle cores."""
    import os
    if any(c.device_type == "cpu" for c in ctx_list):
        n = os.environ.get("OMP_NUM_THREADS", "?")
        return f" ({n} thread{'' if n == '1' else 's'})"
    return ""


def _on_amx_cpus(ctx_list) -> bool:
    """Every device is a CPU whose AMX bfloat16 kernels oneDNN can run (vgg_gluon._env)."""
    from vgg_gluon import _env
    return all(c.device_type == "cpu" for c in ctx_list) and _env.onednn_uses_amx()


def _amx_note(cfg, ctx_list) -> Optional[str]:
    """The one line a new float32 run on AMX CPUs gets about --amp (float16 needs a GPU), or None."""
    if cfg.amp or not _on_amx_cpus(ctx_list):
        return None
    note = ("note: this CPU has AMX: --amp trains in bfloat16 there, about 2x faster for the CIFAR-10 "
            "recipe at the same accuracy (benchmarks/README.md)")
    if cfg.dataset == "cifar10":
        note += "; experiments/cifar10_amx.yaml (what `make train DATASET=cifar10` trains here) spends it on 28 epochs"
    return note


def _precision(session) -> str:
    """', AMP bfloat16' (or float16, or ', float16 weights') when a run does not train in float32."""
    if session.cfg.amp:
        from vgg_gluon.optim import amp_dtype
        return f", AMP {amp_dtype(session.ctx_list)}"
    return ", float16 weights" if session.cfg.dtype == "float16" else ""


def _announce(session, run_dir: Path, console: Console, start_epoch: int) -> None:
    """The run's first line (the data's folder is named: the user sees which copy trains), the
    graph for TensorBoard, the note on how 'best' is chosen, the JSON start event."""
    from vgg_gluon.runtime import ctx_string
    cfg, ds = session.cfg, session.dataset
    console.line(f"run {run_dir}: {cfg.dataset} from {ds.source} ({len(ds.train.labels)} train / "
                 f"{len(ds.test.labels)} test), {session.net.describe()}, input {tuple(session.input_shape)}, "
                 f"ctx {ctx_string(session.ctx_list)}{_cpu_threads(session.ctx_list)}{_precision(session)}, "
                 f"epochs {start_epoch + 1}..{cfg.epochs}")
    if console.tb is not None:
        console.tb.graph(session.net, session.input_shape)
    note = _amx_note(cfg, session.ctx_list) if start_epoch == 0 else None
    if note:
        console.line(note)
    if session.val_loader is None:
        console.line("note: no --val-split, so the 'best' checkpoint is chosen on test accuracy (optimistic); "
                     "the last epoch's test accuracy is the fair figure")
    console.record("start", run=str(run_dir), first_epoch=start_epoch + 1, epochs=cfg.epochs,
                   config=cfg.to_dict())


def _finish(session, run_dir: Path, console: Console, result, outcome) -> None:
    """A finished run: the report and its pictures (never fatal), then the closing line."""
    if session.is_writer:
        from vgg_gluon.inspection import report_after_training_safely
        report_after_training_safely(session, run_dir, console.line)  # never raises
        if console.tb is not None and (run_dir / "mistakes.png").is_file():
            console.tb.image("mistakes", run_dir / "mistakes.png", result.epoch)
    if console.tb is not None:
        console.tb.close()
    console.line(done_line(outcome, session.cfg.eval_tta) + f"; evaluate with `vgg-gluon evaluate {run_dir}`")


def _infer_from_params(params_path, flags: Dict[str, Any], say: bool = False) -> Dict[str, Any]:
    """Fill arch / width / BatchNorm / FC units the user did not give from the file's tensor shapes; with
    `say`, one line on stderr names what was read from the file."""
    from vgg_gluon.foreign import infer_architecture
    inferred = infer_architecture(Path(params_path))
    # The arch too: the data sets' recipes are fast rows, and a file of another script is a classic one.
    used = {k: inferred[k] for k in ("arch", "width", "batch_norm", "fc_units") if k in inferred and k not in flags}
    if say and used:
        words = {"arch": str, "width": lambda v: f"width {v:g}",
                 "batch_norm": lambda v: "BatchNorm" if v else "no BatchNorm",
                 "fc_units": lambda v: f"fc {v}"}
        click.echo(f"{params_path}: inferred " + ", ".join(words[k](v) for k, v in used.items())
                   + " from the file's shapes", err=True)
    return {**used, **flags}


# evaluate: the data and model options that make sense for a bare .params file


@command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--which", type=choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run.")
@click.option("--params", "params_path", type=click.Path(dir_okay=False),
              help="Evaluate a bare .params file (give --dataset; the architecture is read from the file).")
@eval_options
@click.option("--tta", type=choice(TTA_MODES), default=None,
              help="Test-time augmentation: none, flip (image + mirror), flip-translate (also shifted 1 px; "
                   "airbench94). Default: the run's --eval-tta, else none.")
@click.option("--split", type=choice(["test", "val"]), default="test", show_default=True,
              help="Which images: the test set, or the run's validation split if it was trained with one "
                   "(compare settings there, not on the test set).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@friendly_errors
def evaluate(run, which, params_path, as_json, tta, split, **kwargs):
    """Accuracy (top-1, top-5), loss, per-class accuracy and confusion matrix on the test set, or
    on a run's validation split (with test-time augmentation if --tta or the run's --eval-tta asks
    for it).

    \b
    Examples:
      vgg-gluon evaluate checkpoints/<run>
      vgg-gluon evaluate checkpoints/<run> --which last --json
      vgg-gluon evaluate checkpoints/<run> --split val --tta flip
      vgg-gluon evaluate --params TinyVGG11.params --dataset cifar10 --arch vgg11
    """
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import data as data_mod
    from vgg_gluon import engine
    flags = flag_settings(kwargs)
    if bool(run) == bool(params_path):
        raise click.UsageError("give either a run folder or --params FILE")
    split = split.lower()
    if split == "val" and params_path:
        raise BadUsage("--split val needs a run folder trained with --val-split: a bare .params file has no "
                       "validation split")
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
        if split == "val" and not cfg.val_split:
            raise BadUsage(f"--split val: {run} was trained without --val-split, so it has no validation split "
                           f"(train with --val-split 0.1 to compare settings without the test set)")
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
    tta = (tta or cfg.eval_tta).lower()
    loader = session.val_loader if split == "val" else session.eval_loader
    result = engine.evaluate(session.net, loader, session.num_classes, tta=tta)
    print_evaluation(source, epoch, cfg, result, list(session.dataset.classes), as_json, split)


def print_evaluation(source, epoch, cfg: RunConfig, result: Dict[str, Any], classes, as_json: bool,
                     split: str = "test") -> None:
    """The evaluate command's table or JSON object."""
    counts = [int(sum(row)) for row in result["confusion"]]
    out = {"source": str(source.path if hasattr(source, "path") else source), "epoch": epoch, "split": split,
           "dataset": cfg.dataset, "arch": cfg.arch, "tta": result.get("tta", "none"),
           "accuracy": result["acc"], "top5_accuracy": result["top5_acc"],
           "top_k": result["top_k"], "loss": result["loss"], "samples": result["samples"],
           "img_per_s": result["img_per_s"], "classes": classes,
           "per_class_accuracy": dict(zip(classes, result["per_class_acc"])),
           "per_class_count": dict(zip(classes, counts)), "confusion": result["confusion"]}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{out['source']}" + (f" (epoch {epoch})" if epoch is not None else ""))
    tta = out["tta"]
    click.echo(f"{cfg.dataset} {split} ({'no TTA' if tta == 'none' else 'TTA ' + tta}): accuracy {result['acc']:.4f}  "
               f"top-{result['top_k']} {result['top5_acc']:.4f}  "
               f"loss {result['loss']:.4f}  {result['samples']} images  {result['img_per_s']:,.0f} img/s")
    click.echo("\nper-class accuracy:")
    width = max(len(c) for c in classes)
    for name, acc, n in zip(classes, result["per_class_acc"], counts):
        click.echo(f"  {name:<{width}}  {acc:.4f}  ({n} images)")
    click.echo("\nconfusion matrix (rows: true class, columns: predicted):")
    click.echo("  " + " " * width + "".join(f"{i:>6}" for i in range(len(classes))))
    for i, (name, row) in enumerate(zip(classes, result["confusion"])):
        click.echo(f"  {name:<{width}}" + "".join(f"{v:>6}" for v in row) + f"   ({i})")


@command("data")
@click.argument("dataset", type=choice(DATASETS))
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

