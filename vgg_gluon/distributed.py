"""Data-parallel training over MXNet's parameter server (KVStore `dist_sync`, `dist_device_sync`,
`dist_async`), for processes started with the `DMLC_*` environment (see `vgg_gluon.launch`).

Design:

- Rank and number of workers come from the kvstore (ps-lite assigns ranks as workers register).
  `--batch-size` stays the *global* batch: each worker trains on `batch_size / num_workers`
  images per step, from its shard of the permutation every worker draws from the shared seed
  (`BatchLoader(shard=(rank, num_workers))`), so one synchronous step sees exactly the images
  of one single-process step.
- Synchronous modes use `Trainer(update_on_kvstore=False)`: the servers only sum gradients and
  every worker applies the same update with its own copy of the optimizer state. The workers'
  weights stay bit-identical and `trainer.states` can be saved and resumed as in one process.
  BatchNorm running statistics (not gradients, so not summed by the Trainer) are averaged over
  workers at every epoch end, before evaluation and the checkpoint; train loss/accuracy are
  averaged too. Ctrl-C/SIGTERM is agreed on collectively every step (one 4-byte push/pull), so all
  workers stop after the same step and rank 0 saves a mid-epoch checkpoint.
- `dist_async` needs `update_on_kvstore=True` (MXNet refuses anything else): the optimizer and its
  state (momentum) live on the servers and cannot be read back. Its checkpoints keep weights, the
  update count and the LR schedule, but not momentum: a resumed async run restarts momentum at
  zero (documented in the README). At each epoch end the workers meet at a barrier and pull the
  servers' weights, and take rank 0's BatchNorm statistics, so they evaluate the same model.
- Evaluation: every worker evaluates the whole test set with identical weights (no sharding), so
  the numbers are the same on every worker by construction; it costs one redundant pass each.
- Only rank 0 writes checkpoints, history, plots, train.log and the progress bar.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from vgg_gluon.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

DIST_KVSTORES = ("dist_sync", "dist_device_sync", "dist_async")
DMLC_VARS = ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER")
# Our own integer keys, far above the Trainer's 0..len(params)-1. (String keys would be mapped
# into the same integer space by MXNet and could collide with the Trainer's.)
STOP_KEY = 9_000_000
METRICS_KEY = 9_000_001
AUX_KEY_BASE = 10_000_000   # + epoch * 10_000 + parameter index (async: fresh keys every epoch)
# Test-only: every worker writes its final weights and epoch rows here (worker-<rank>.*).


class DistError(ConfigError):
    """A one-line, user-facing problem with distributed training."""


def is_distributed(kvstore: Optional[str]) -> bool:
    return bool(kvstore) and str(kvstore).startswith("dist")


def wanted(kvstore: Optional[str], env=None) -> bool:
    """A dist kvstore, or a process started as a worker (which must then use one)."""
    env = os.environ if env is None else env
    return is_distributed(kvstore) or env.get("DMLC_ROLE") == "worker"


def check_environment(kvstore: str, env=None) -> None:
    """Refuse a dist kvstore outside a launched worker: mx.kv.create would wait forever."""
    env = os.environ if env is None else env
    if not is_distributed(kvstore):
        raise DistError(f"this process was launched as a worker (DMLC_ROLE=worker) but uses --kvstore "
                        f"{kvstore}: pass --kvstore dist_sync, dist_device_sync or dist_async")
    missing = [v for v in DMLC_VARS if not env.get(v)]
    if missing:
        raise DistError(f"--kvstore {kvstore} needs the DMLC_* environment of a launched worker "
                        f"({missing[0]} is not set): start it with `vgg-gluon launch -n N -- train ...`, "
                        "or use --kvstore device for one process")
    if env["DMLC_ROLE"] != "worker":
        raise DistError(f"DMLC_ROLE is '{env['DMLC_ROLE']}': only workers run vgg-gluon commands "
                        "(servers and the scheduler run `python -c 'import mxnet'`)")


def local_batch_size(global_batch: int, num_workers: int, num_devices: int = 1) -> int:
    """Per-worker batch for a global --batch-size; it must divide evenly."""
    if global_batch % num_workers:
        raise DistError(f"batch size {global_batch} does not split evenly over {num_workers} workers: "
                        f"use a multiple of {num_workers}")
    local = global_batch // num_workers
    if local < num_devices:
        raise DistError(f"batch size {global_batch} leaves {local} images per worker, fewer than its "
                        f"{num_devices} devices")
    return local


def default_run_name(cfg: RunConfig, env=None) -> str:
    """Every worker must write to (rank 0) / read from the same folder: the launcher's id names it."""
    env = os.environ if env is None else env
    launch_id = env.get("VGG_GLUON_LAUNCH_ID")
    if not launch_id:
        raise DistError("distributed training needs --name RUN so that every worker uses the same run "
                        "folder (vgg-gluon launch picks one when --name is not given)")
    return f"{cfg.dataset}-{cfg.arch}-{launch_id}"


def average_device_copies(net) -> None:
    """Several devices in one process: BatchNorm's running statistics are not gradients, so the
    kvstore never reconciles them and each device keeps the statistics of its own slices. Replace
    them by their mean on every device (at each epoch end), so evaluation does not depend on which
    device a sample lands on and the checkpoint (device 0's copy) holds all of them."""
    import mxnet as mx
    for p in net.collect_params().values():
        copies = p.list_data() if p.grad_req == "null" else []
        if len(copies) > 1:
            first = copies[0].context
            mean = mx.nd.add_n(*[c.as_in_context(first) for c in copies]) / len(copies)
            for c in copies:
                mean.copyto(c)


def statistics_before_mid_epoch_save(session) -> None:
    """A stop inside an epoch: make the BatchNorm statistics one set (devices, and workers in the
    sync modes, where the stop is collective) before rank 0 saves, as at an epoch end. The running
    averages are linear in their start, so a resumed run then ends the epoch with the statistics an
    uninterrupted one would have. dist_async workers do not stop together: rank 0's are saved."""
    dist = getattr(session, "dist", None)
    if dist is not None:
        if dist.sync:
            dist.average_statistics(session.trainer)
    elif len(session.ctx_list) > 1:
        average_device_copies(session.net)


# ------------------------------------------------------------------------------------------------
# process exit: a failed worker must exit now, not wait at MXNet's exit barrier for its peers
@dataclass
class _ExitState:
    clean: bool = False
    code: int = 1


_EXIT = _ExitState()
_ACTIVE: list = []   # keeps the KVStore alive until interpreter teardown (after our atexit hook)


def note_outcome(status: str, session=None) -> None:
    """Record how fit() ended. 'finished' and 'stopped' exits go through MXNet's barrier at exit
    (rank 0 then stops the servers); anything else leaves with os._exit so no worker hangs.

    Training is over: the network's parameters are detached from the Trainer, so later loads into
    the same network (the end-of-run report) do not try to reset the dist kvstore (MXNet refuses).
    """
    from vgg_gluon.errors import EXIT_NONFINITE
    _EXIT.clean = status in ("finished", "stopped")
    _EXIT.code = EXIT_NONFINITE if status == "nonfinite" else 1
    if session is not None:
        for p in session.net.collect_params().values():
            p._trainer = None


def _exit_hook() -> None:
    if _ACTIVE and not _EXIT.clean:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(_EXIT.code)


# ------------------------------------------------------------------------------------------------
from vgg_gluon.runtime import import_mxnet  # noqa: E402

mx = import_mxnet()
from mxnet import gluon  # noqa: E402


class DistTrainer(gluon.Trainer):
    """gluon.Trainer with the two things a dist kvstore changes.

    sync: the pulled gradient is the sum over all workers, so a step normalizes by the global
    batch (local batch x workers). async: every push is one update on the servers; the local
    optimizer never steps, so its update count is kept here (for the LR shown and saved), and
    `save_states` writes the optimizer without per-parameter state (that lives on the servers).
    """

    def __init__(self, *args, num_workers: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._num_workers = int(num_workers)

    def _is_async(self) -> bool:
        return "async" in str(self._kvstore_params["kvstore"].type)

    def step(self, batch_size, ignore_stale_grad=False):
        if self._is_async():
            super().step(batch_size, ignore_stale_grad)
            # Each worker's push is one update on the servers: all workers together advance it
            # by num_workers per step (exact at epoch ends, where all workers meet).
            self._optimizer.num_update += self._num_workers
        else:
            super().step(batch_size * self._num_workers, ignore_stale_grad)

    def save_states(self, fname):
        if not self._is_async():
            return super().save_states(fname)
        with open(fname, "wb") as f:
            f.write(pickle.dumps(({}, self._optimizer)))


def mxnet_lr_scheduler(cfg: RunConfig, iters_per_epoch: int):
    """The run's schedule with MXNet's own classes, for dist_async, whose servers unpickle the
    optimizer while `import mxnet` is still running (gluoncv, which our usual schedule comes from,
    cannot be imported there). Same shapes: linear warmup, then constant / step / cosine."""
    total = max(1, int(cfg.epochs * iters_per_epoch))
    warm = int(cfg.warmup_epochs * iters_per_epoch)
    lr = cfg.effective_lr()
    common = dict(base_lr=lr, warmup_steps=warm, warmup_begin_lr=lr * cfg.lr_start)
    if cfg.lr_schedule == "cosine":
        return mx.lr_scheduler.CosineScheduler(max(total, warm + 1), final_lr=lr * cfg.lr_end, **common)
    if cfg.lr_schedule == "linear":
        return mx.lr_scheduler.PolyScheduler(max(total, warm + 1), pwr=1, final_lr=lr * cfg.lr_end, **common)
    steps = [int(e * iters_per_epoch) for e in cfg.lr_steps if e * iters_per_epoch > warm] \
        if cfg.lr_schedule == "step" else []
    if steps:
        return mx.lr_scheduler.MultiFactorScheduler(steps, factor=cfg.lr_factor, **common)
    return mx.lr_scheduler.MultiFactorScheduler([total * 10], factor=1.0, **common)  # constant


@dataclass
class DistContext:
    kv: Any
    kind: str
    rank: int
    num_workers: int

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def sync(self) -> bool:
        return "async" not in self.kind

    # -- trainer --------------------------------------------------------------------------------
    def make_trainer(self, net, cfg: RunConfig, steps_per_epoch: int) -> DistTrainer:
        from vgg_gluon.optim import make_trainer
        # async: the servers count one update per worker push, and unpickle MXNet's own classes.
        iters = steps_per_epoch * (1 if self.sync else self.num_workers)
        trainer = make_trainer(net, cfg, iters, schedule=None if self.sync else mxnet_lr_scheduler(cfg, iters),
                               trainer_cls=DistTrainer, kvstore=self.kv, update_on_kvstore=not self.sync,
                               num_workers=self.num_workers)
        if not self.sync:
            # The servers get the optimizer now, with the gradient scale of every later step
            # (MXNet refuses a different scale afterwards in this mode).
            trainer._optimizer.rescale_grad = trainer._scale / (cfg.batch_size // self.num_workers)
        self.init_trainer_keys(trainer)
        return trainer

    def init_trainer_keys(self, trainer) -> None:
        """Put rank 0's weights on the servers and into every worker, now.

        Done here rather than lazily at the first step with the Trainer's per-parameter broadcast:
        MXNet's dist init has rank 0 push and then everyone meet at a barrier, but for CPU arrays
        rank 0 does not wait for its push to complete (it waits on a communication buffer that CPU
        pushes do not use), so another worker's pull can reach the server first and abort it
        ("init N first", seen here when resuming; cf. apache/mxnet#7893). So: init every key,
        wait for the pushes, meet at a barrier, then pull.
        """
        trainer._init_kvstore()
        params = list(trainer._params)
        # Plain-layout copies: a CPU push sends the array's memory as it is, and after a forward
        # pass MKLDNN may hold conv weights in its own layout (MXNet then refuses the push).
        plain = [mx.nd.array(p.list_data()[0].asnumpy(), ctx=mx.cpu(), dtype=p.dtype) for p in params]
        self._safe_init(list(range(len(params))), plain)
        for i, (p, buf) in enumerate(zip(params, plain)):
            self.kv.pull(i, out=buf, priority=-i)
            for d in p.list_data():
                buf.copyto(d)
        trainer._params_to_init = []
        mx.nd.waitall()

    # -- collective operations ------------------------------------------------------------------
    def _safe_init(self, keys, values) -> None:
        """kv.init whose value is on the servers before any worker goes on (see init_trainer_keys)."""
        self.kv.init(keys, values)
        mx.nd.waitall()
        self.kv._barrier()

    def _allreduce(self, key: int, values):
        """Sum of `values` (NDArray on cpu) over workers (sync mode: the server stores the sum)."""
        out = mx.nd.zeros(values.shape, ctx=mx.cpu())
        self.kv.push(key, values)
        self.kv.pull(key, out=out)
        return out

    def stop_checker(self, local: Callable[[], bool]) -> Callable[[], bool]:
        """A should_stop() that every worker answers the same way at the same step (sync)."""
        if not self.sync:
            return local
        seen = {"stop": False}

        def should_stop() -> bool:
            if not seen["stop"]:
                flag = mx.nd.array([1.0 if local() else 0.0], ctx=mx.cpu())
                seen["stop"] = float(self._allreduce(STOP_KEY, flag).asscalar()) > 0
            return seen["stop"]
        return should_stop

    def average_statistics(self, trainer) -> None:
        """BatchNorm running mean/var (not gradients): the mean over every worker's every device.
        Collective (sync modes): all workers call it at the same point."""
        for i, p in enumerate(trainer._params):
            if p.grad_req == "null":
                copies = p.list_data()
                self.kv.push(i, copies, priority=-i)
                self.kv.pull(i, out=copies, priority=-i)
                for c in copies:
                    c /= self.num_workers * len(copies)
        mx.nd.waitall()

    def epoch_end(self, net, trainer, metrics: Dict[str, float], epoch: int) -> Dict[str, float]:
        """Make every worker hold the same model before evaluation and the checkpoint."""
        params = list(trainer._params)
        mx.nd.waitall()
        if self.sync:
            self.average_statistics(trainer)
            pair = mx.nd.array([metrics["train_loss"], metrics["train_acc"]], ctx=mx.cpu())
            loss, acc = (self._allreduce(METRICS_KEY, pair) / self.num_workers).asnumpy().tolist()
            # Workers step together: the run's throughput is the sum of theirs.
            metrics = dict(metrics, train_loss=loss, train_acc=acc,
                           img_per_s=metrics["img_per_s"] * self.num_workers)
        else:
            self.kv._barrier()   # every push of the epoch has been applied on the servers
            for i, p in enumerate(params):
                if p.grad_req != "null":
                    self.kv.pull(i, out=p.list_data(), priority=-i)
                else:              # async servers would treat a push as a gradient: take rank 0's
                    key = AUX_KEY_BASE + epoch * 10_000 + i
                    self._safe_init(key, p.list_data()[0])
                    self.kv.pull(key, out=p.list_data())
        mx.nd.waitall()
        return metrics


def create(kvstore: str) -> DistContext:
    """Join the parameter server (blocks until every node registered) and return rank/size."""
    check_environment(kvstore)
    kv = mx.kv.create(kvstore)
    ctx = DistContext(kv, kvstore, int(kv.rank), int(kv.num_workers))
    _ACTIVE.append(ctx)
    atexit.register(_exit_hook)
    if ctx.sync:
        ctx._safe_init([STOP_KEY, METRICS_KEY], [mx.nd.zeros((1,), ctx=mx.cpu()), mx.nd.zeros((2,), ctx=mx.cpu())])
    log.info("joined %s as worker %d of %d", kvstore, ctx.rank, ctx.num_workers)
    return ctx


def load_trainer_states(session, path: Path) -> None:
    """Resume optimizer state; for dist_async only the update count and schedule come back."""
    from vgg_gluon import checkpoint as ck
    dist = getattr(session, "dist", None)
    trainer = session.trainer
    if dist is None or dist.sync:
        ck.load_trainer_states(trainer, path)
        return
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ck.CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    states = ck.safe_unpickle_states(data, Path(path))
    optimizer = states[1] if isinstance(states, tuple) and len(states) == 2 else None
    if not isinstance(optimizer, mx.optimizer.Optimizer):
        raise ck.CheckpointError(f"{path}: not an MXNet optimizer state file")
    n = int(optimizer.num_update)
    trainer._optimizer.num_update = trainer._optimizer.begin_num_update = n
    # The schedule for this run's (possibly extended) --epochs, counted in pushes of all workers.
    trainer._optimizer.lr_scheduler = mxnet_lr_scheduler(session.cfg, len(session.train_loader) * dist.num_workers)
    trainer._kvstore.set_optimizer(trainer._optimizer)   # the servers' copy resumes the schedule
    log.warning("dist_async resume: update count %d and LR schedule restored; momentum restarts "
                "at zero (it lived on the parameter servers)", n)
