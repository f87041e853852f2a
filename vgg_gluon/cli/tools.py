"""The commands that look at networks and runs: summary, predict, export, report, runs (the work is
done in `inspection`, `report` and `runs`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vgg_gluon.cli.common import friendly_errors
from vgg_gluon.cli.group import command
from vgg_gluon.cli.options import choice as _choice
from vgg_gluon.cli.options import flag_settings as _flag_settings
from vgg_gluon.cli.options import resolve_config, setting_option
from vgg_gluon.config import RunConfig


def _run_arg(required: bool = True):
    return click.argument("run", required=required, type=click.Path(file_okay=False))


_ctx = click.option("--ctx", default="cpu", show_default=True,
                    help="Device to run the network on: cpu, gpu, gpu:1 (the first of a list is used).")
_which = click.option("--which", type=_choice(["best", "last"]), default="best", show_default=True,
                      help="Which checkpoint of the run.")


# ------------------------------------------------------------------------------------------------
@command()
@_run_arg(required=False)
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Recipe YAML (experiments/*.yaml); flags override it.")
@setting_option("dataset", help="Sets channels (1 or 3); default fashion-mnist.")
@setting_option("arch")
@setting_option("width")
@setting_option("batch_norm")
@setting_option("fc_units")
@setting_option("image_size")
@click.option("--channels", type=click.IntRange(min=1), help="Input channels (overrides --dataset).")
@click.option("--classes", "num_classes", type=click.IntRange(min=1), default=None, help="Output classes (default 10).")
@click.option("--layers", is_flag=True, help="One row per layer (conv, bn, relu, pool, ...) instead of per block.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly_errors
def summary(run, config_path, channels, num_classes, layers, as_json, **kwargs):
    """Output shape, parameters and multiply-adds of every block (or layer) of a network, plus totals.

    Describes the network `train` would build with the same flags, or the network of a run folder.
    Computed from the configuration (no weights, no forward pass), for any spec and input size.

    \b
    Examples:
      vgg-gluon summary --arch vgg11 --width 0.25 --image-size 224 --channels 1 --no-batch-norm
      vgg-gluon summary --config experiments/d2l_vgg11_224.yaml --layers
      vgg-gluon summary checkpoints/<run> --json
    """
    from vgg_gluon import data as data_mod
    from vgg_gluon.inspection import run_config, run_num_classes
    from vgg_gluon.inspection import summary as make_summary
    flags = _flag_settings(kwargs)
    if run:
        if config_path or flags:
            raise click.UsageError("a run folder brings its own settings: give either RUN or spec flags")
        cfg = run_config(Path(run))
        num_classes = num_classes or run_num_classes(Path(run))
    else:
        cfg = resolve_config(config_path, flags)
    shape = data_mod.input_shape(cfg.dataset, cfg.image_size)
    if channels:
        shape = (channels,) + tuple(shape[1:])
    s = make_summary(cfg.arch, width=cfg.width, batch_norm=cfg.batch_norm, fc_units=cfg.fc_units,
                     num_classes=num_classes or 10, input_shape=shape, layers=layers)
    if as_json:
        click.echo(json.dumps(s))
        return
    from vgg_gluon.inspection import format_summary_text
    click.echo(format_summary_text(s))


# ------------------------------------------------------------------------------------------------
@command()
@_run_arg()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many classes to list per image.")
@_which
@_ctx
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (errors are listed in it too).")
@friendly_errors
def predict(run, images, top_k, which, ctx, as_json):
    """Classify image files (PNG/JPEG, any size or mode) or folders of them with a trained run.

    Each image is converted exactly like the run's training data: grayscale and resized to 28 px,
    then zero-padded to 32, for Fashion-MNIST; RGB at 32 x 32 for CIFAR-10; resized further when the
    run used --image-size; then normalized with the run's mean and std. Fashion-MNIST pictures are
    light garments on a black background: photos on white will be misread. A file that cannot be
    read gets one line on stderr, the others are still classified; the exit code is then 1.

    \b
    Examples:
      vgg-gluon predict checkpoints/<run> shoe.png shirt.jpg
      vgg-gluon predict checkpoints/<run> photos/ --top-k 5 --json
    """
    from vgg_gluon.inspection import expand_inputs, load_run_model, predict_files
    paths = expand_inputs(images)
    if not paths:
        raise click.ClickException("no image files found in " + ", ".join(images))
    model = load_run_model(Path(run), which.lower(), ctx)
    preds, errors = predict_files(model, paths, top_k)
    for e in errors:
        click.echo(f"Error: {e}", err=True)
    if as_json:
        click.echo(json.dumps({"run": str(run), "checkpoint": model.checkpoint.name, "epoch": model.checkpoint.epoch,
                               "predictions": [{"file": p.file, "top": p.top} for p in preds],
                               "errors": errors}))
    else:
        for p in preds:
            click.echo(f"{p.file}: " + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in p.top))
    if errors:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
@command()
@_run_arg()
@click.argument("out_dir", type=click.Path(file_okay=False))
@_which
@_ctx
@click.option("--force", is_flag=True, help="Replace an export already in OUT_DIR.")
@friendly_errors
def export(run, out_dir, which, ctx, force):
    """Write the run's network for serving without vgg-gluon: symbol JSON + params
    (HybridBlock.export), preprocessing.json (mean, std, size, channels, padding, class names)
    and serve_example.py (mxnet + Pillow only).

    Load it with:  mx.gluon.SymbolBlock.imports("OUT/model-symbol.json", ["data"], "OUT/model-0000.params")

    \b
    Examples:
      vgg-gluon export checkpoints/<run> exported/
      vgg-gluon export checkpoints/<run> exported/ --which last
      python exported/serve_example.py shoe.png
    """
    from vgg_gluon.inspection import EXPORT_PREFIX, load_run_model
    from vgg_gluon.inspection import export as do_export
    existing = sorted(p.name for p in Path(out_dir).glob("*") if p.name.startswith(EXPORT_PREFIX + "-")
                      or p.name in ("preprocessing.json", "serve_example.py", "vgg_image.py")) \
        if Path(out_dir).is_dir() else []
    if existing and not force:
        raise click.ClickException(f"{out_dir} already holds an export ({', '.join(existing)}): pass --force to "
                                   "replace it, or choose another folder")
    model = load_run_model(Path(run), which.lower(), ctx)
    files = do_export(model, Path(out_dir))
    click.echo(f"exported {model.checkpoint.path} (epoch {model.checkpoint.epoch}) to {out_dir}:")
    for f in files.values():
        click.echo(f"  {f}")


# ------------------------------------------------------------------------------------------------
@command()
@_run_arg()
@_which
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the data set is (default as in training).")
@click.option("--test-limit", type=click.IntRange(min=1), help="Use only the first N test images.")
@_ctx
@friendly_errors
def report(run, which, data_dir, test_limit, ctx):
    """Write curves.png, confusion.png, mistakes.png and report.md (with the per-class table) into
    the run folder. Training writes them at the end of a finished run too.

    \b
    Examples:
      vgg-gluon report checkpoints/<run>
      vgg-gluon report checkpoints/<run> --which last --test-limit 1000
    """
    from vgg_gluon.inspection import report_for_run
    files = report_for_run(Path(run), which.lower(), data_dir=data_dir, test_limit=test_limit, ctx=ctx)
    for f in files.values():
        click.echo(str(f))


# ------------------------------------------------------------------------------------------------
@command()
@click.option("--dir", "parent", type=click.Path(file_okay=False), default=None,
              help=f"Folder holding the run folders (default {RunConfig.output_dir}).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@friendly_errors
def runs(parent, as_json):
    """List run folders, newest first: data set, architecture, epochs done/planned, best and last
    test accuracy, last update and state (finished, stopped, running, crashed).

    \b
    Examples:
      vgg-gluon runs
      vgg-gluon runs --dir /data/checkpoints --json
    """
    from vgg_gluon.runs import format_runs, list_runs
    if parent is not None and not Path(parent).is_dir():
        raise click.ClickException(f"{parent}: no such folder")
    parent = Path(parent or RunConfig.output_dir)
    rows = list_runs(parent)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "updated_ts"} for r in rows]))
        return
    if not rows:
        click.echo(f"no run folders under {parent}")
        return
    click.echo(format_runs(rows))
