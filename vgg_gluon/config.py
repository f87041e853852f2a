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
ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19", "fast3", "fast3s")  # = models.VGG_SPECS (a test checks)
OPTIMIZERS = ("sgd", "nag", "adam")
SCHEDULES = ("constant", "step", "cosine", "linear")
ACTIVATIONS = ("relu", "gelu")
TTA_MODES = ("none", "flip", "flip-translate")
KVSTORES = ("device", "local", "dist_sync", "dist_device_sync", "dist_async")
DTYPES = ("float32", "float16")


# The data sets' default recipes: what a run of that data set changes from RunConfig's defaults,
# whether it is started with bare flags (`vgg-gluon train --dataset cifar10`), the Makefile or
# experiments/<dataset>.yaml (which spells the same values out; a test keeps them equal).
RECIPES: Dict[str, Dict[str, Any]] = {
    "fashion-mnist": {"epochs": 8, "lr": 0.1, "warmup_epochs": 0.5},
    "cifar10": {"epochs": 15, "lr": 0.1, "warmup_epochs": 1.0, "augment_crop": 4, "augment_flip": True},
}


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


@dataclass
class RunConfig:
    # data
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None          # None: $VGG_GLUON_DATA_DIR or ./data
    image_size: Optional[int] = None        # None: native 32 px (Fashion-MNIST padded 28 -> 32)
    augment_crop: int = 0                   # random crop with this much zero padding (0 = off)
    augment_flip: bool = False              # random horizontal flip
    alternate_flip: bool = False            # flip: each image's random flip of epoch 1, inverted every other epoch
    augment_cutout: int = 0                 # cutout: zero a square of this side at a random place (0 = off)
    val_split: float = 0.0                  # fraction of train held out for validation
    train_limit: Optional[int] = None       # use only the first N training images
    test_limit: Optional[int] = None
    # model
    arch: str = "vgg11"
    width: float = 0.25
    batch_norm: bool = True
    fc_units: Optional[int] = None          # None: 4096 * width
    dropout: float = 0.5
    hybridize: bool = True
    dtype: str = "float32"                  # float16: fp16 weights/activations, fp32 master weights
    amp: bool = False                       # MXNet AMP: float16 where safe, dynamic loss scaling
    activation: str = "relu"                # relu or gelu (convolutions; the mlp head stays relu)
    bn_scale: bool = True                   # False: BatchNorm learns only its shift (gamma fixed at 1)
    bn_momentum: float = 0.9                # running = m * running + (1 - m) * batch (PyTorch's 0.6 = 0.4 here)
    whiten: bool = False                    # patch stem (fast3*): frozen whitening filters from training data
    # optimization
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    lr_base_batch: Optional[int] = None     # set: lr is per this many images, scaled by batch_size / it
    bias_lr_mult: float = 1.0               # LR multiplier of BatchNorm shifts/scales and biases
    no_wd_bias: bool = False                # no weight decay on BatchNorm shifts/scales and biases
    momentum: float = 0.9
    wd: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_steps: List[int] = field(default_factory=list)  # epochs at which "step" multiplies by lr_factor
    lr_factor: float = 0.1
    label_smoothing: float = 0.0
    lookahead: bool = False                 # lookahead (airbench94): an EMA of the weights copied back
    lookahead_every: int = 5                # steps between lookahead updates
    lookahead_decay: float = 0.95           # per-step decay; the update uses decay**every * (t/T)**3
    lookahead_start: float = 0.3            # fraction of the run before the first update
    eval_tta: str = "none"                  # test-time augmentation of the per-epoch evaluation
    seed: int = 42
    # devices and run folder
    ctx: str = "auto"
    kvstore: str = "device"
    run_name: Optional[str] = None
    output_dir: str = "checkpoints"
    keep_last: int = 3
    log_interval: int = 20                  # steps between progress-bar readings of loss/accuracy

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

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
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("eval_tta", self.eval_tta, TTA_MODES)
        if self.lookahead and self.kvstore == "dist_async":
            raise SettingError("lookahead", "needs one set of weights per step: not with kvstore dist_async",
                               ("kvstore",))
        if self.alternate_flip and not self.augment_flip:
            raise SettingError("alternate_flip", "changes how images are flipped: use it with augment_flip",
                               ("augment_flip",))
        if self.whiten and self.arch in ("vgg11", "vgg13", "vgg16", "vgg19"):
            raise SettingError("whiten", f"initializes a patch stem, which {self.arch} has not: use arch fast3 "
                               "or fast3s", ("arch",))
        for name in ("bn_momentum", "lookahead_decay", "lookahead_start"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SettingError(name, f"must be in [0, 1), got {getattr(self, name)}")
        _positive("lookahead_every", self.lookahead_every)
        _positive("bias_lr_mult", self.bias_lr_mult)
        if self.lr_base_batch is not None:
            _positive("lr_base_batch", self.lr_base_batch)
        if self.amp and self.dtype != "float32":
            raise SettingError("amp", "keeps float32 weights and casts per operator: use it with dtype float32",
                               ("dtype",))
        for name in ("epochs", "batch_size", "lr", "width", "keep_last", "log_interval"):
            _positive(name, getattr(self, name))
        for name in ("fc_units", "train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.image_size is not None and self.image_size < 32:
            raise SettingError("image_size", f"must be at least 32 (five 2x2 poolings), got {self.image_size}")
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


# Types of fields whose default is None, for coercion of YAML/CLI strings.
_OPTIONAL_TYPES = {"data_dir": str, "image_size": int, "train_limit": int, "test_limit": int,
                   "fc_units": int, "run_name": str, "lr_base_batch": int}


def _coerce(key: str, value: Any) -> Any:
    default = getattr(RunConfig(), key)
    kind = _OPTIONAL_TYPES.get(key) or type(default)
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
