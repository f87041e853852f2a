"""RunConfig: every setting of a run, resolved as defaults < experiments/*.yaml < command-line flags.

The resolved config is written into the run folder (config.yaml), so a run can be reproduced and
resumed from its folder alone.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from vgg_gluon.errors import UserError

DATASETS = ("fashion-mnist", "cifar10")
CLASSIC_ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19")  # the paper's; the tutorial .params mapping knows these
#: airbench's 3-block rows: airbench94's widths, a slimmer one, airbench95's widths (models.LAYOUTS).
FAST_ARCHS = ("fast3", "fast3s", "fast3w")
ARCHS = CLASSIC_ARCHS + FAST_ARCHS  # = models.VGG_SPECS (a test checks)
OPTIMIZERS = ("sgd", "nag", "adam", "muon")
SCHEDULES = ("constant", "step", "cosine", "linear")
ACTIVATIONS = ("relu", "gelu")
TTA_MODES = ("none", "flip", "flip-translate")
PAD_MODES = ("zero", "reflect")
KVSTORES = ("device", "local", "dist_sync", "dist_device_sync", "dist_async")
DTYPES = ("float32", "float16")


# The data sets' default recipes: what a run of that data set changes from RunConfig's defaults,
# whether it is started with bare flags (`vgg-gluon train --dataset cifar10`), the Makefile or
# experiments/<dataset>.yaml (which spells the same values out; a test keeps them equal).
#: airbench94's techniques (Jordan 2024, arXiv 2404.00498) for the fast rows (FAST_ARCHS).
FAST_TRAINING: Dict[str, Any] = {
    "batch_norm": True, "activation": "relu", "bn_scale": False, "bn_momentum": 0.4, "whiten": True,
    "batch_size": 512, "optimizer": "nag", "lr": 1.5, "lr_base_batch": 1024, "momentum": 0.85,
    "wd": 0.00133, "bias_lr_mult": 64.0, "no_wd_bias": True, "lr_schedule": "linear",
    "label_smoothing": 0.2, "lookahead": True, "lookahead_every": 5, "lookahead_decay": 0.95,
    "lookahead_start": 0.3, "augment_crop": 2, "augment_flip": True, "alternate_flip": True,
    "eval_tta": "flip-translate",
}
RECIPES: Dict[str, Dict[str, Any]] = {
    "fashion-mnist": {"arch": "fast3", "width": 0.5, "image_size": 28, **FAST_TRAINING, "epochs": 6,
                      "warmup_epochs": 1.4},
    # CIFAR-10 also takes airbench94's remaining details (chosen on a validation split, benchmarks/README.md).
    "cifar10": {"arch": "fast3", "width": 0.5, **FAST_TRAINING, "activation": "gelu", "bn_momentum": 0.6,
                "bn_eps": 1e-12, "lr_start": 0.2, "lr_end": 0.07, "stem_bias_epochs": 3, "augment_pad": "reflect",
                "epochs": 14, "warmup_epochs": 3.2},
}
#: What a classic row (vgg11..vgg19) gets on each data set when the data set's recipe is a fast row:
#: the fast-training settings need the patch stem and were sized for it.
CLASSIC_RECIPES: Dict[str, Dict[str, Any]] = {
    "fashion-mnist": {"epochs": 8, "lr": 0.1, "warmup_epochs": 0.5},
    "cifar10": {"epochs": 15, "lr": 0.1, "warmup_epochs": 1.0, "augment_crop": 4, "augment_flip": True},
}


def recipe_for(dataset: str, arch: Optional[str]) -> Dict[str, Any]:
    """The data set's recipe, or its classic one when `arch` (typed, or from a file) is a classic
    row and the recipe's own network is not."""
    recipe = RECIPES.get(dataset, {})
    if arch in CLASSIC_ARCHS and recipe.get("arch", "vgg11") not in CLASSIC_ARCHS:
        return CLASSIC_RECIPES[dataset]
    return recipe


class ConfigError(UserError, ValueError):
    """A one-line, user-facing problem with a setting.

    `fields` names the settings the problem is about, so the command line can name the option the
    user typed (`--width`) and treat it as bad usage, and a recipe file can name its key."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


class SettingError(ConfigError):
    """A bad value of one setting: `detail` says what is wrong with it ("must be positive, got 0")."""

    def __init__(self, field: str, detail: str, others: Sequence[str] = ()):
        super().__init__(f"{field} {detail}", (field, *others))
        self.field, self.detail = field, detail
        self.source: Optional[str] = None   # a file or "recipe" the value came from, when known

    def __str__(self) -> str:
        return (f"{self.source}: " if self.source else "") + f"{self.field} {self.detail}"


def setting(default: Any = None, help: str = "", *, group: str, kind: Optional[type] = None,
            choices: Sequence[str] = (), option: Optional[str] = None, factory=None):
    """A RunConfig field with what the command line needs to know about it: its help text, its
    option group, its type when the default is None, its choices and, when it differs from the
    field's name, its option (cli.options generates the options from these, so the help, the
    choices and the default shown cannot drift from the field)."""
    meta = {"help": help, "group": group, "kind": kind, "choices": tuple(choices), "option": option}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # data
    dataset: str = setting("fashion-mnist", "Data set.", group="data", choices=DATASETS)
    data_dir: Optional[str] = setting(None, "Where data sets are looked for and downloaded (default: "
                                      "$VGG_GLUON_DATA_DIR or ./data).", group="data", kind=str)
    image_size: Optional[int] = setting(None, "Resize each batch to N x N (the tutorials use 96 or 224; "
                                        "default: the native 32 px, Fashion-MNIST's 28 zero-padded).",
                                        group="data", kind=int)
    augment_crop: int = setting(0, "Random crop of the image padded by N px (0 = off).", group="augment")
    augment_pad: str = setting("zero", "How --augment-crop pads: zero (black) or reflect (mirrored border, "
                               "airbench94).", group="augment", choices=PAD_MODES)
    augment_flip: bool = setting(False, "Random horizontal flip.", group="augment")
    alternate_flip: bool = setting(False, "Derandomized flip (airbench94): each image's random flip of epoch 1, "
                                   "inverted every other epoch (needs --augment-flip).", group="augment")
    augment_cutout: int = setting(0, "Cutout: zero an N x N square at a random place (0 = off).", group="augment")
    val_split: float = setting(0.0, "Hold out this fraction of the training set for validation; 'best' is "
                               "then chosen on it.", group="data")
    train_limit: Optional[int] = setting(None, "Use only the first N training images.", group="data", kind=int)
    test_limit: Optional[int] = setting(None, "Use only the first N test images.", group="data", kind=int)
    # model
    arch: str = setting("vgg11", "VGG configuration: vgg11..vgg19 (A, B, D, E of Simonyan & Zisserman; they "
                        "get the data set's classic recipe, experiments/*_vgg11.yaml) or fast3/fast3s/fast3w "
                        "(airbench's 3-block rows: 64/256/256, 64/128/256, 128/384/384 channels at width 1).",
                        group="model", choices=ARCHS)
    width: float = setting(0.25, "Channel width multiplier (0.25 = the tutorials' ratio 4).", group="model")
    batch_norm: bool = setting(True, "BatchNorm after every convolution.", group="model")
    fc_units: Optional[int] = setting(None, "Units of the two hidden dense layers (default 4096 x width).",
                                      group="model", kind=int)
    dropout: float = setting(0.5, "Dropout after each hidden dense layer.", group="model")
    hybridize: bool = setting(True, "Compile the network (static_alloc, static_shape; several CPU contexts "
                              "compile without them, which race there).", group="model")
    dtype: str = setting("float32", "float16: half-precision weights and activations with float32 master "
                         "weights (multi_precision); for GPUs.", group="optim", choices=DTYPES)
    amp: bool = setting(False, "MXNet automatic mixed precision: float16 per operator with dynamic loss "
                        "scaling on GPUs; bfloat16 on a CPU with AVX512-BF16 (with BatchNorm only where "
                        "the CPU has AMX: ~2x faster there, slower without).", group="optim")
    activation: str = setting("relu", "Activation of the convolutions (the dense head stays relu).", group="model",
                              choices=ACTIVATIONS)
    bn_scale: bool = setting(True, "BatchNorm learns a scale (off: only its shift, as airbench94).", group="model")
    bn_momentum: float = setting(0.9, "BatchNorm running-average momentum, Gluon's convention: running = "
                                 "m x running + (1 - m) x batch (airbench94's 0.6 is Gluon's 0.6; the fast "
                                 "recipes use 0.4, see benchmarks/README.md).", group="model")
    bn_eps: float = setting(1e-5, "BatchNorm epsilon (airbench94: 1e-12).", group="model")
    whiten: bool = setting(False, "Initialize the 2x2 patch stem (fast3, fast3s, fast3w) from the training data's "
                           "patch covariance, frozen.", group="model")
    # optimization
    epochs: int = setting(10, "Total epochs of the run.", group="optim")
    batch_size: int = setting(128, "Global batch size, split across devices.", group="optim")
    optimizer: str = setting("sgd", "Optimizer.", group="optim", choices=OPTIMIZERS)
    lr: float = setting(0.05, "Peak learning rate.", group="optim")
    lr_base_batch: Optional[int] = setting(None, "--lr is per N images: the LR used is lr x batch-size / N "
                                           "(default: --lr as is).", group="optim", kind=int)
    bias_lr_mult: float = setting(1.0, "LR multiplier of the BatchNorm shifts and scales (airbench94: 64).",
                                  group="optim")
    no_wd_bias: bool = setting(False, "No weight decay on BatchNorm and bias parameters.", group="optim",
                               option="--no-wd-bias")
    momentum: float = setting(0.9, "Momentum for sgd/nag (muon: of the parameters other than filters).", group="optim")
    muon_lr: float = setting(0.24, "--optimizer muon: the convolution filters' peak LR, a step relative to their "
                             "norm (airbench94_muon: 0.24); the other parameters take NAG at --lr.", group="optim")
    muon_momentum: float = setting(0.6, "--optimizer muon: the filters' Nesterov momentum (airbench94_muon: 0.6).",
                                   group="optim")
    wd: float = setting(5e-4, "Weight decay.", group="optim")
    lr_schedule: str = setting("cosine", "Per-iteration schedule after the warmup.", group="optim",
                               choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, "Linear warmup over this many epochs.", group="optim")
    lr_start: float = setting(0.0, "LR where the warmup starts, as a fraction of the peak (airbench94: 0.2).",
                              group="optim")
    lr_end: float = setting(0.0, "LR where a linear or cosine schedule ends, as a fraction of the peak "
                            "(airbench94: 0.07).", group="optim")
    stem_bias_epochs: int = setting(0, "Epochs the patch stem's bias trains before it is frozen (airbench94: 3; "
                                    "0 = it always trains).", group="optim")
    lr_steps: List[int] = setting(None, "Epochs where the step schedule multiplies the LR by --lr-factor, "
                                  "e.g. 15,25.", group="optim", factory=list)
    lr_factor: float = setting(0.1, "Step schedule factor.", group="optim")
    label_smoothing: float = setting(0.0, "Label smoothing epsilon.", group="optim")
    lookahead: bool = setting(False, "Lookahead (airbench94): an EMA of the weights copied back every "
                              "--lookahead-every steps.", group="optim")
    lookahead_every: int = setting(5, "Steps between lookahead updates.", group="optim")
    lookahead_decay: float = setting(0.95, "Lookahead per-step decay (the update uses decay**every * (t/T)**3).",
                                     group="optim")
    lookahead_start: float = setting(0.3, "Fraction of the run before lookahead starts.", group="optim")
    eval_tta: str = setting("none", "Test-time augmentation of the per-epoch evaluation.", group="optim",
                            choices=TTA_MODES)
    seed: int = setting(42, "Seed for initialization, data order, augmentation and dropout.", group="optim")
    # devices and run folder
    ctx: str = setting("auto", "Devices: auto, cpu, gpu, gpu:0,1 or cpu:0,1 (auto: all GPUs, else the CPU).",
                       group="run")
    kvstore: str = setting("device", "Gradient aggregation: device or local in one process; dist_sync, "
                           "dist_device_sync or dist_async for workers of `vgg-gluon launch`.", group="run",
                           choices=KVSTORES)
    run_name: Optional[str] = setting(None, "Run folder name (default <dataset>-<arch>-<time>).", group="folder",
                                      kind=str, option="--name")
    output_dir: str = setting("checkpoints", "Parent folder of run folders.", group="folder")
    keep_last: int = setting(3, "Keep the newest N epoch checkpoints (the best one is always kept).", group="run")
    log_interval: int = setting(20, "Steps between progress readings of loss and accuracy.", group="run")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_kind(cls, name: str) -> type:
        """The Python type of a setting's values (from its metadata when the default is None)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return f.metadata.get("kind") or (list if f.default_factory is list else type(f.default))

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "RunConfig":
        cfg = cls()
        cfg.update(values, source)
        return cfg

    def update(self, values: Dict[str, Any], source: str = "config") -> "RunConfig":
        """Apply settings; unknown keys get a suggestion. None values mean 'not given'."""
        names = self.field_names()
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                raise ConfigError(f"{source}: unknown setting '{key}'"
                                  + (f" (did you mean '{hint[0]}'?)" if hint else ""))
            if value is not None:
                try:
                    setattr(self, key, _coerce(key, value))
                except SettingError as exc:
                    exc.source = source
                    raise
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> "RunConfig":
        return cls.from_dict(load_yaml(path), source=str(path))

    def effective_lr(self) -> float:
        """The peak LR used: lr, scaled linearly to the batch size when lr_base_batch is set."""
        return self.lr * self.batch_size / self.lr_base_batch if self.lr_base_batch else self.lr

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise ConfigError on the first bad value, with the allowed range."""
        _choice("dataset", self.dataset, DATASETS)
        _choice("arch", self.arch, ARCHS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("kvstore", self.kvstore, KVSTORES)
        _choice("dtype", self.dtype, DTYPES)
        from vgg_gluon.runtime import RuntimeSetupError, parse_ctx  # the --ctx syntax (no MXNet import)
        try:
            parse_ctx(self.ctx)
        except RuntimeSetupError as exc:   # a malformed value is bad usage; a missing GPU is not (resolve_ctx)
            raise SettingError("ctx", str(exc)) from None
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("eval_tta", self.eval_tta, TTA_MODES)
        _choice("augment_pad", self.augment_pad, PAD_MODES)
        if self.lookahead and self.kvstore == "dist_async":
            raise SettingError("lookahead", "needs one set of weights per step: not with kvstore dist_async",
                               ("kvstore",))
        if self.optimizer == "muon" and self.kvstore == "dist_async":
            raise SettingError("optimizer", "muon runs on the workers: not with kvstore dist_async, whose servers "
                               "run MXNet's own optimizers", ("kvstore",))
        if self.optimizer == "muon" and self.dtype != "float32":
            raise SettingError("optimizer", "muon orthogonalizes float32 filters: use it with dtype float32",
                               ("dtype",))
        if self.alternate_flip and not self.augment_flip:
            raise SettingError("alternate_flip", "changes how images are flipped: use it with augment_flip",
                               ("augment_flip",))
        if self.whiten and self.arch in CLASSIC_ARCHS:
            raise SettingError("whiten", f"initializes a patch stem, which {self.arch} has not: use arch "
                               f"{' or '.join(FAST_ARCHS)}", ("arch",))
        if self.stem_bias_epochs < 0:
            raise SettingError("stem_bias_epochs", f"must not be negative, got {self.stem_bias_epochs}")
        if self.stem_bias_epochs and self.arch in CLASSIC_ARCHS:
            raise SettingError("stem_bias_epochs", f"freezes a patch stem's bias, which {self.arch} has not: "
                               f"use arch {' or '.join(FAST_ARCHS)}", ("arch",))
        if not self.bn_eps > 0:
            raise SettingError("bn_eps", f"must be positive, got {self.bn_eps}")
        for name in ("bn_momentum", "muon_momentum", "lookahead_decay", "lookahead_start", "lr_start", "lr_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SettingError(name, f"must be in [0, 1), got {getattr(self, name)}")
        _positive("lookahead_every", self.lookahead_every)
        _positive("bias_lr_mult", self.bias_lr_mult)
        if self.lr_base_batch is not None:
            _positive("lr_base_batch", self.lr_base_batch)
        if self.amp and self.dtype != "float32":
            raise SettingError("amp", "keeps float32 weights and casts per operator: use it with dtype float32",
                               ("dtype",))
        for name in ("epochs", "batch_size", "lr", "muon_lr", "width", "keep_last", "log_interval"):
            _positive(name, getattr(self, name))
        for name in ("fc_units", "train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        # models.VGG.min_image_size: 2 ** pools (+ stem - 1): 32 for the classic rows, 9 for fast3(s).
        smallest, why = ((32, "five 2x2 poolings") if self.arch in CLASSIC_ARCHS
                         else (9, "a 2x2 stem, three 2x2 poolings"))
        if self.image_size is not None and self.image_size < smallest:
            raise SettingError("image_size", f"must be at least {smallest} ({why}) for {self.arch}, "
                               f"got {self.image_size}", ("arch",))
        for name in ("dropout", "val_split", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SettingError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("momentum", "wd", "warmup_epochs", "augment_crop", "augment_cutout"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must not be negative, got {getattr(self, name)}")
        if self.momentum >= 1:
            raise SettingError("momentum", f"must be below 1, got {self.momentum}")
        if self.warmup_epochs >= self.epochs:
            raise SettingError("warmup_epochs", f"must be less than epochs ({self.epochs}), got {self.warmup_epochs}",
                               ("epochs",))
        if not 0 < self.lr_factor <= 1:
            raise SettingError("lr_factor", f"must be in (0, 1], got {self.lr_factor}")
        if sorted(self.lr_steps) != list(self.lr_steps) or any(s <= 0 for s in self.lr_steps):
            raise SettingError("lr_steps", f"must be increasing positive epochs, got {self.lr_steps}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name
                                          or self.run_name in (".", "..")):
            raise SettingError("run_name", f"'{self.run_name}' must be a plain folder name")
        return self


def _coerce(key: str, value: Any) -> Any:
    kind = RunConfig.field_kind(key)
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is list:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return [int(v) for v in value]
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        what = {bool: "true or false", list: "a comma-separated list of whole epochs (e.g. 15,25)",
                int: "a whole number", float: "a number"}.get(kind, "text")
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        raise SettingError(key, f"must be {what}, got {shown!r}") from None


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        raise SettingError(name, f"'{value}' is not one of {', '.join(choices)}"
                           + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def _positive(name: str, value) -> None:
    if value is None or value <= 0:
        raise SettingError(name, f"must be positive, got {value}")


def load_yaml(path: Path) -> Dict[str, Any]:
    """Read a YAML mapping; any problem becomes one ConfigError line naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data
