"""The command line's options, generated from RunConfig's fields (`config.setting`): each option's
name, type, choices, help and shown default live in one place, the field; and how typed values
become a validated RunConfig (defaults < the data set's recipe < --config YAML < flags)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import click

from vgg_gluon.config import RECIPES, ConfigError, RunConfig, SettingError, load_yaml, recipe_for
from vgg_gluon.errors import EXIT_USAGE

_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_PATHS = {"data_dir", "output_dir"}          # folders: click checks they are not files


class BadUsage(click.ClickException):
    """Bad usage in one line (`Error: Invalid value for '--width': ...`), exit 2 like click's own checks."""
    exit_code = EXIT_USAGE


def option_name(field: str) -> str:
    """The command-line option of a RunConfig field: lr_steps -> --lr-steps, run_name -> --name."""
    meta = _FIELDS[field].metadata if field in _FIELDS else {}
    return meta.get("option") or "--" + field.replace("_", "-")


def choice(values) -> click.Choice:
    return click.Choice(values, case_sensitive=False)


def combine(*opts):
    """Several click decorators as one."""
    def deco(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return deco


def _shown_default(name: str) -> str:
    """'(default X)', with the data sets' recipes where they differ: the help cannot drift."""
    f = _FIELDS[name]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None or value == []:
        return ""
    shown = str(value).lower() if isinstance(value, bool) else str(value)
    per_recipe = [f"{ds} {str(r[name]).lower() if isinstance(r[name], bool) else r[name]}"
                  for ds, r in RECIPES.items() if name in r]
    return f" (default {shown}" + (f"; recipes: {', '.join(per_recipe)}" if per_recipe else "") + ")"


def setting_option(name: str, help: Optional[str] = None):
    """The click option of one RunConfig field. It defaults to None (= not typed), so that only
    what the user typed overrides the recipe and the YAML."""
    meta, kind = _FIELDS[name].metadata, RunConfig.field_kind(name)
    opt = option_name(name)
    text = (help or meta["help"]) + ("" if help else _shown_default(name))
    if kind is bool:
        off = "--" + opt[5:] if opt.startswith("--no-") else f"--no-{opt[2:]}"   # --no-wd-bias/--wd-bias
        return click.option(f"{opt}/{off}", name, default=None, help=text)
    if meta.get("choices"):
        typ = choice(meta["choices"])
    elif name in _PATHS:
        typ = click.Path(file_okay=False)
    else:
        typ = str if kind is list else kind
    return click.option(opt, name, type=typ, default=None, help=text)


def group_options(group: str, *, skip=()):
    """The options of every field of one group, in the fields' order."""
    return combine(*(setting_option(n) for n, f in _FIELDS.items()
                     if f.metadata.get("group") == group and n not in skip))


augment_flag = click.option("--augment/--no-augment", default=None,
                            help="Random crop (4 px padding) and horizontal flip for training (the same as "
                                 "--augment-crop 4 --augment-flip; the classic cifar10 recipe: on).")
data_options = combine(group_options("data"), augment_flag, group_options("augment"))
model_options = group_options("model")
optim_options = group_options("optim")
run_options = combine(
    group_options("run"),
    click.option("-q", "--quiet", is_flag=True,
                 help="No progress bar and no per-epoch lines (train.log still written)."),
    click.option("--tensorboard", type=click.Path(file_okay=False),
                 help="Write TensorBoard event files into DIR: scalars per step and epoch, the network graph, "
                      "the mistakes grid (tensorboard --logdir DIR shows them)."),
    click.option("--log-json", type=click.Path(dir_okay=False, allow_dash=True),
                 help="Append one JSON object per epoch (and one at the end) to FILE; '-' = stdout, "
                      "the human lines then go to stderr."),
)


def flag_settings(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The RunConfig settings the user typed (None means not given), choices in lower case."""
    out = {k: v for k, v in kwargs.items() if k in _FIELDS and v is not None}
    if kwargs.get("augment") is not None:
        out.setdefault("augment_crop", 4 if kwargs["augment"] else 0)
        out.setdefault("augment_flip", bool(kwargs["augment"]))
    for k, v in list(out.items()):
        if _FIELDS[k].metadata.get("choices"):
            out[k] = v.lower()
    return out


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


def resolve_config(config_path: Optional[str], flags: Dict[str, Any]) -> RunConfig:
    """defaults < the data set's recipe (config.RECIPES; config.CLASSIC_RECIPES for a classic row
    when the recipe's network is a fast one) < --config YAML < flags."""
    yaml_values = load_yaml(Path(config_path)) if config_path else {}
    dataset = str(flags.get("dataset") or yaml_values.get("dataset") or RunConfig.dataset).lower()
    arch = flags.get("arch") or yaml_values.get("arch")
    cfg = RunConfig()
    recipe = recipe_for(dataset, str(arch).lower() if arch else None)
    if recipe:
        cfg.update(recipe, "recipe")
    cfg.update(yaml_values, config_path or "config")
    if "epochs" in flags and "warmup_epochs" not in flags and flags["epochs"] > 0 \
            and cfg.warmup_epochs >= flags["epochs"]:
        # A quick trial (`--epochs 1`) of a recipe with a longer warmup keeps the warmup's share of
        # the run rather than refusing a setting the user never typed.
        cfg.warmup_epochs = cfg.warmup_epochs * flags["epochs"] / cfg.epochs
    cfg = apply_flags(cfg, flags, earlier=config_path or f"the {dataset} recipe")
    if cfg.train_limit and cfg.train_limit < cfg.batch_size and "batch_size" not in flags:
        # A quick trial (`--train-limit 128`) of a recipe with large batches: one batch of all the
        # images, rather than refusing a batch size the user never typed (the LR follows the batch
        # when the recipe has lr_base_batch).
        cfg.batch_size = cfg.train_limit
    return cfg
