"""Optimizer state files (`Trainer.save_states` writes a pickle): loaded through a restricted
unpickler that admits only optimizer and LR-scheduler classes, NDArray, numpy arrays and plain
containers, so a malicious .states file cannot run code."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from vgg_gluon.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# restricted loading of optimizer states (MXNet writes them with pickle)
_ALLOWED_GLOBALS = {
    ("mxnet.ndarray.ndarray", "NDArray"),
    ("builtins", "bytearray"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
}
# Optimizer and LR-scheduler classes are admitted by module, but only real subclasses.
_OPTIMIZER_MODULES = ("mxnet.optimizer.optimizer", "mxnet.optimizer", "vgg_gluon.muon")
_SCHEDULER_MODULES = ("mxnet.lr_scheduler", "gluoncv.utils.lr_scheduler", "vgg_gluon.optim")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _OPTIMIZER_MODULES or module in _SCHEDULER_MODULES:
            import mxnet as mx
            obj = super().find_class(module, name)
            base = mx.optimizer.Optimizer if module in _OPTIMIZER_MODULES else mx.lr_scheduler.LRScheduler
            if isinstance(obj, type) and issubclass(obj, base):
                return obj
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}'")


def safe_unpickle_states(data: bytes, path: Path) -> Any:
    """Unpickle optimizer states admitting only optimizer, scheduler, NDArray and plain data."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if not str(exc).startswith("refused to load"):  # e.g. "pickle data was truncated"
            raise CheckpointError(f"{path}: optimizer state file is corrupted ({exc})") from None
        raise CheckpointError(
            f"{path}: not loaded, it is not a plain MXNet optimizer state file ({exc})") from None
    except Exception as exc:  # truncated/corrupt pickles raise many types
        raise CheckpointError(f"{path}: optimizer state file is corrupted ({type(exc).__name__})") from None


def load_trainer_states(trainer, path: Path) -> None:
    """Equivalent of `Trainer.load_states`, but through the restricted unpickler.

    MXNet's own `load_states` calls `pickle.loads` on the file, which would run any code in it;
    here the validated object is handed to the updaters directly (mxnet 1.9.1 internals, pinned).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    states = safe_unpickle_states(data, path)
    if not (isinstance(states, tuple) and len(states) == 2 and isinstance(states[0], dict)):
        raise CheckpointError(f"{path}: not an MXNet optimizer state file (no optimizer saved in it)")
    state_dict, optimizer = states
    import mxnet as mx
    if not isinstance(optimizer, mx.optimizer.Optimizer):
        raise CheckpointError(f"{path}: not an MXNet optimizer state file")
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if set(state_dict) - set(range(len(trainer._params))):
        raise CheckpointError(f"{path}: optimizer state is for another network "
                              f"({len(state_dict)} entries, network has {len(trainer._params)} parameters)")
    expected = type(trainer._optimizer).__name__
    if type(optimizer).__name__ != expected:
        raise CheckpointError(f"{path}: holds a {type(optimizer).__name__} optimizer state, "
                              f"this run uses {expected}")

    def _install(updater, states_obj, opt):
        updater.states, updater.optimizer = states_obj, opt
        updater.states_synced = dict.fromkeys(updater.states.keys(), False)

    if trainer._update_on_kvstore:
        updater = getattr(trainer._kvstore, "_updater", None)
        if updater is None:
            raise CheckpointError(f"{path}: optimizer state lives on the parameter servers with "
                                  "this kvstore and cannot be restored into it")
        _install(updater, state_dict, optimizer)
    else:
        # Every device's updater gets its own copy (states are moved to its device lazily).
        for i, updater in enumerate(trainer._updaters):
            _install(updater, state_dict if i == 0 else safe_unpickle_states(data, path), optimizer)
    trainer._optimizer = optimizer
    optimizer.param_dict = {i: p for i, p in enumerate(trainer._params)}


