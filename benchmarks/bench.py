"""Training/evaluation throughput of vgg-gluon vs PyTorch on this CPU, interleaved and fair.

    python benchmarks/bench.py throughput [--sizes 32,96,224] [--quick] [--peers eager_nchw,eager_cl,...]
    python benchmarks/bench.py levers       # MXNet settings A/B (contexts, threads, aggregation, bulk, batch, bf16)
    python benchmarks/bench.py onednn       # which oneDNN kernels a training step runs (MKLDNN_VERBOSE=1)
    python benchmarks/bench.py peak         # theoretical fp32 peak + matrix products only
    python benchmarks/bench.py syncs        # cost of the per-step NaN read and per-step seeding
    python benchmarks/bench.py threads      # thread/engine settings sweep (MXNet only)

The driver imports neither framework. It starts long-lived worker processes (this same file with
`worker mxnet` / `worker torch`; separate processes because both bundle their own OpenMP runtime)
and sends them one JSON command at a time, alternating MXNet and the PyTorch peers so that any
drift in machine load hits all of them. While one worker is timed every other worker is stopped
(SIGSTOP, SIGCONT before its next command), so no OpenMP thread of the idle framework can spin on
a core the timed one needs (both wheels use GNU libgomp, which spins after each parallel region;
KMP_BLOCKTIME does not apply to it). Every timed unit is a "chunk" of K training steps ending in
a full synchronisation; the figure per step is chunk time / K, the reported value the median over
>= 5 chunks after warm-up, printed with the min-max of the chunks and, for every peer, the spread
of the per-round pair ratios. After each row, each framework's worker is timed again chunk for
chunk against a fresh process of the same framework that has never run beside the other one
("alone check"), and the bench prints whether the two agree within the noise.

The MXNet side is the project's own code path: `engine.build_session` (the real Fashion-MNIST
BatchLoader with shuffling and crop+flip augmentation, the hybridized VGG, the Trainer) and
`engine.train_one_epoch` for every timed step, on synthetic batches (a loader that yields one
pre-made batch) and on real batches (the session's BatchLoader).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "@@BENCH "


# ------------------------------------------------------------------------------------------------
# workers
def _reply(obj) -> None:
    sys.__stdout__.write(TAG + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


class _SyntheticLoader:
    """Duck-typed BatchLoader: `steps` copies of one pre-made normalized batch."""

    def __init__(self, data, labels, ctx_list, steps):
        self.data, self.labels, self.ctx_list, self.steps = data, labels, ctx_list, steps

    def __len__(self):
        return self.steps

    def epoch(self, epoch, start_batch=0):
        for _ in range(start_batch, self.steps):
            yield self.data, self.labels


class _LoaderWindow:
    """`steps` consecutive batches of a real BatchLoader, starting at batch `start`."""

    def __init__(self, loader, start, steps):
        self.loader, self.start, self.steps, self.ctx_list = loader, start, steps, loader.ctx_list

    def __len__(self):
        return self.steps

    def epoch(self, epoch, start_batch=0):
        it = self.loader.epoch(epoch, start_batch=self.start + start_batch)
        for _ in range(self.steps - start_batch):
            yield next(it)


class MXWorker:
    def __init__(self):
        # The benchmark venv also holds torch 2.x, and gluoncv (imported for the LR schedulers)
        # refuses to import next to a torch it does not know; the MXNet side never needs torch.
        sys.modules["torch"] = None
        import vgg_gluon  # noqa: F401, I001  (thread settings before mxnet)
        import mxnet as mx
        from vgg_gluon import engine, netsummary
        self.mx, self.engine, self.netsummary = mx, engine, netsummary
        self.s = None
        self.dataset, self.dataset_name = None, None
        self.real_pos = 0
        self.epoch = 1

    def info(self, _):
        mx = self.mx
        feats = mx.runtime.Features()
        return {"mxnet": mx.__version__, "mkldnn": feats.is_enabled("MKLDNN"),
                "env": {k: v for k, v in os.environ.items()
                        if k.startswith(("OMP_", "MKL_", "MXNET_", "KMP_", "GOMP_", "VGG_GLUON"))}}

    def setup(self, a):
        from vgg_gluon import data as data_mod
        from vgg_gluon.config import RunConfig
        mx = self.mx
        if a.get("amp_bf16") and not getattr(self, "_amp_bf16", False):
            # MXNet AMP with bfloat16 (oneDNN kernels on CPUs with AVX512-BF16): patches the operator
            # namespaces, so it must run before the network is built; float32 weights and updates.
            # "conv": only convolutions in bfloat16, BatchNorm and the dense layers kept in float32.
            from mxnet.contrib import amp
            if a["amp_bf16"] == "conv":
                from mxnet.contrib.amp.lists import symbol_bf16
                amp.init(target_dtype="bfloat16", target_precision_ops=["Convolution"],
                         fp32_ops=list(symbol_bf16.FP32_FUNCS) + ["BatchNorm", "FullyConnected"])
            else:
                amp.init(target_dtype="bfloat16")
            self._amp_bf16 = True
        if a.get("net") == "fast3":
            # The CIFAR-10 default recipe's network and step (config.RECIPES, = experiments/cifar10.yaml);
            # no lookahead (the timed loop has no after-step hook) and no label smoothing (the
            # loop would need the smoothed targets): both are a small share of a step; evaluation
            # without TTA, as for vgg11.
            from vgg_gluon.config import RECIPES
            cfg = RunConfig(**{**RECIPES["cifar10"], "dataset": "cifar10", "lookahead": False, "label_smoothing": 0.0,
                               "image_size": None if a["size"] == 32 else a["size"], "batch_size": a["batch"],
                               "warmup_epochs": 1, "epochs": 100, "eval_tta": "none", "seed": 42,
                               "ctx": a.get("ctx", "cpu"), "hybridize": True})
        else:
            cfg = RunConfig(dataset="fashion-mnist", arch="vgg11", width=0.25, batch_norm=a["bn"],
                            fc_units=a.get("fc_units"), image_size=None if a["size"] == 32 else a["size"],
                            batch_size=a["batch"], lr=0.01, momentum=0.9, wd=5e-4, lr_schedule="cosine",
                            epochs=100, augment_crop=a.get("crop", 4), augment_flip=a.get("flip", True),
                            dropout=0.5, seed=42, ctx=a.get("ctx", "cpu"), hybridize=True,
                            **({"dtype": a["dtype"]} if a.get("dtype") else {}))
        if self.dataset is None or self.dataset_name != cfg.dataset:
            self.dataset = data_mod.load_dataset(cfg.dataset, None, download=False)
            self.dataset_name = cfg.dataset
        self.s = self.engine.build_session(cfg, dataset=self.dataset)
        self.cfg = cfg
        ctx = self.s.ctx_list
        if a.get("static_alloc"):
            # build_session turns static_alloc off for several CPU contexts (a BatchNorm
            # running-statistics race); the "ctx2_static" lever measures what that costs.
            self.s.net.hybridize(static_alloc=True, static_shape=True)
        # One pre-made batch, split over the contexts as the real loader splits it.
        per = [a["batch"] // len(ctx) + (1 if i < a["batch"] % len(ctx) else 0) for i in range(len(ctx))]
        xs, ys = [], []
        for c, n in zip(ctx, per):
            xs.append(mx.random.normal(shape=(n,) + tuple(self.s.input_shape), ctx=c))
            ys.append(mx.nd.array(list(i % 10 for i in range(n)), ctx=c))
        self.syn = (xs, ys)
        self.real_pos = 0
        self.seed = a.get("seed", 42)
        macs = self.netsummary.count_macs(cfg.arch, cfg.width, cfg.batch_norm, cfg.fc_units, 10,
                                          tuple(self.s.input_shape))
        return {"macs": macs, "steps_per_epoch": len(self.s.train_loader), "ctx": [str(c) for c in ctx]}

    def _run(self, loader):
        s = self.s
        mx = self.mx
        c0, t0 = os.times(), time.perf_counter()
        self.engine.train_one_epoch(s.net, s.trainer, loader, s.loss_fn, epoch=self.epoch,
                                    num_classes=10, log_interval=10 ** 9, seed=self.seed)
        mx.nd.waitall()
        c1, dt = os.times(), time.perf_counter() - t0
        self.cpu_s = (c1.user - c0.user) + (c1.system - c0.system)  # all threads of this process
        return dt

    def train(self, a):
        k = a["steps"]
        if a["data"] == "synthetic":
            loader = _SyntheticLoader(*self.syn, self.s.ctx_list, k)
        else:
            total = len(self.s.train_loader)
            if self.real_pos + k > total:
                self.real_pos, self.epoch = 0, self.epoch + 1
            loader = _LoaderWindow(self.s.train_loader, self.real_pos, k)
            self.real_pos += k
        sec = self._run(loader)
        return {"seconds": sec, "cpu_seconds": self.cpu_s}

    def pipeline(self, a):
        """The real BatchLoader alone: per-batch time to gather, copy and transform (crop, flip,
        normalize, resize), each batch waited for; median over a["steps"] batches."""
        it = self.s.train_loader.epoch(self.epoch + 1000)
        times = []
        for _ in range(a["steps"]):
            t0 = time.perf_counter()
            x, y = next(it)
            for arr in x + y:
                arr.wait_to_read()
            times.append(time.perf_counter() - t0)
        return {"seconds": statistics.median(times[2:] or times)}

    def epoch_real(self, a):
        """One whole real-data epoch through train_one_epoch (shuffle, augmentation, metrics)."""
        s = self.s
        t0 = time.perf_counter()
        m = self.engine.train_one_epoch(s.net, s.trainer, s.train_loader, s.loss_fn, epoch=self.epoch,
                                        num_classes=10, log_interval=s.cfg.log_interval, seed=self.seed,
                                        on_progress=lambda p: None)
        self.mx.nd.waitall()
        dt = time.perf_counter() - t0
        self.epoch += 1
        return {"seconds": dt, "images": len(s.train_loader) * s.cfg.batch_size,
                "engine_img_per_s": m["img_per_s"]}

    def variant(self, a):
        """Synthetic chunk through a variant of train_one_epoch: without per-step seeding and/or
        without the lagged per-step NaN read (a patched copy of the engine's own source)."""
        import inspect
        import textwrap
        v = a["variant"]
        fn = self.engine.train_one_epoch
        if v in ("no_nan_read", "neither"):
            if not hasattr(self, "_no_read"):
                src = textwrap.dedent(inspect.getsource(fn))
                marker = "        if prev_loss is not None:\n            value = _sum_scalars(prev_loss)"
                assert marker in src, "engine loop changed: update the benchmark's patch"
                src = src.replace(marker, "        if False:\n            value = _sum_scalars(prev_loss)", 1)
                ns = dict(vars(self.engine))
                exec(compile(src, "<patched train_one_epoch>", "exec"), ns)
                self._no_read = ns["train_one_epoch"]
            fn = self._no_read
        seed = None if v in ("no_seed", "neither") else self.seed
        s = self.s
        loader = _SyntheticLoader(*self.syn, s.ctx_list, a["steps"])
        t0 = time.perf_counter()
        fn(s.net, s.trainer, loader, s.loss_fn, epoch=self.epoch, num_classes=10,
           log_interval=20, seed=seed, on_progress=lambda p: None)
        self.mx.nd.waitall()
        return {"seconds": time.perf_counter() - t0}

    def eval(self, a):
        mx = self.mx
        x = self.syn[0][0]
        t0 = time.perf_counter()
        for _ in range(a["steps"]):
            out = self.s.net(x)
        out.wait_to_read()
        mx.nd.waitall()
        return {"seconds": time.perf_counter() - t0}

    def eval_real(self, a):
        r = self.engine.evaluate(self.s.net, self.s.eval_loader, 10)
        return {"seconds": r["seconds"], "images": r["samples"], "acc": r["acc"]}

    def matmul(self, a):
        """n x n fp32 products: "dot" is nd.dot (OpenBLAS in the pip wheel), "onednn" is
        FullyConnected without bias (oneDNN's inner product, the kernel MXNet's Dense layers run)."""
        mx = self.mx
        n = a["n"]
        x = mx.nd.random.uniform(shape=(n, n))
        y = mx.nd.random.uniform(shape=(n, n))
        if a.get("backend", "dot") == "onednn":
            def op():
                return mx.nd.FullyConnected(x, y, no_bias=True, num_hidden=n)
        else:
            def op():
                return mx.nd.dot(x, y)
        return {"times": _time_op(lambda: op().wait_to_read(), a)}

    def flush(self, _):
        """Flush C stdio, so oneDNN's verbose lines reach the driver before our reply."""
        import ctypes
        ctypes.CDLL(None).fflush(None)
        return {}


def _time_op(fn, a) -> list:
    """Run fn once (warm-up), then time it `reps` times or until `seconds` have passed (>= 3)."""
    fn()
    times, t_end = [], time.perf_counter() + a.get("seconds", 0.0)
    while len(times) < a.get("reps", 3) or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


PEERS = ("eager_nchw", "eager_cl", "compile_nchw", "compile_cl")
PEER_LABEL = {"eager_nchw": "eager NCHW", "eager_cl": "eager channels_last",
              "compile_nchw": "torch.compile NCHW", "compile_cl": "torch.compile channels_last"}


class TorchWorker:
    """The PyTorch peers, one model + optimizer each, all in one process: eager or torch.compile
    (default inductor mode), NCHW or channels_last (the layout PyTorch recommends for CPU
    convolutions: oneDNN runs them without reorders)."""

    def __init__(self):
        import torch
        self.torch = torch
        n = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        torch.set_num_threads(n)
        self.peers = {}

    def info(self, _):
        t = self.torch
        return {"torch": t.__version__, "threads": t.get_num_threads(),
                "mkldnn": t.backends.mkldnn.is_available(),
                "cpu_capability": t.backends.cpu.get_cpu_capability()}

    def _build(self, bn, fc_units, width=0.25):
        nn = self.torch.nn
        spec = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
        layers, c = [], 1
        for n, ch in spec:
            ch = int(ch * width)
            for _ in range(n):
                layers.append(nn.Conv2d(c, ch, 3, padding=1, bias=not bn))
                if bn:
                    layers.append(nn.BatchNorm2d(ch))
                layers.append(nn.ReLU(inplace=True))
                c = ch
            layers.append(nn.MaxPool2d(2, 2))
        return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(fc_units), nn.ReLU(inplace=True),
                             nn.Dropout(0.5), nn.Linear(fc_units, fc_units), nn.ReLU(inplace=True),
                             nn.Dropout(0.5), nn.Linear(fc_units, 10))

    def _build_fast3(self, width=0.5, in_ch=3):
        """airbench94's network as the project's fast3 row builds it (the CIFAR-10 default: width
        0.5, GELU, BatchNorm learning only its shift, a frozen 2x2 stem; logits x 1/9 left out)."""
        nn = self.torch.nn

        def bn(c):
            b = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
            b.weight.requires_grad = False
            return b

        def group(ci, co):
            return [nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.MaxPool2d(2), bn(co), nn.GELU(),
                    nn.Conv2d(co, co, 3, padding=1, bias=False), bn(co), nn.GELU()]
        w1, w2, w3 = int(64 * width), int(256 * width), int(256 * width)
        stem = nn.Conv2d(in_ch, 2 * in_ch * 4, 2, bias=True)
        stem.weight.requires_grad = False
        return nn.Sequential(stem, nn.GELU(), *group(2 * in_ch * 4, w1), *group(w1, w2), *group(w2, w3),
                             nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, 10, bias=False))

    def setup(self, a):
        t = self.torch
        import torch._dynamo as dynamo
        dynamo.reset()  # every (size, variant) compiles afresh; no recompile limit is reached
        fc = a.get("fc_units") or 1024
        fast3 = a.get("net") == "fast3"
        self.peers = {}
        for name in a.get("peers", ["eager_nchw"]):
            t.manual_seed(0)
            model = self._build_fast3() if fast3 else self._build(a["bn"], fc)
            x = t.randn(a["batch"], 3 if fast3 else 1, a["size"], a["size"])
            model(x[:2])  # materialize LazyLinear
            if name.endswith("_cl"):
                model = model.to(memory_format=t.channels_last)
                x = x.contiguous(memory_format=t.channels_last)
            fwd = t.compile(model) if name.startswith("compile") else model
            params = [q for q in model.parameters() if q.requires_grad]
            opt = (t.optim.SGD(params, lr=0.001, momentum=0.85, nesterov=True, weight_decay=5e-4) if fast3
                   else t.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4))
            self.peers[name] = {"model": model, "fwd": fwd, "opt": opt, "x": x}
        self.y = t.arange(a["batch"]) % 10
        self.loss_fn = t.nn.CrossEntropyLoss()
        # --precision bf16: autocast, PyTorch's mixed precision on a CPU (bfloat16 convolutions and
        # matrix products through oneDNN, AMX where the CPU has it; float32 weights and SGD).
        self.bf16 = bool(a.get("amp_bf16"))
        return {}

    def train(self, a):
        t = self.torch
        p = self.peers[a.get("peer", "eager_nchw")]
        p["model"].train()
        fwd, opt, x = p["fwd"], p["opt"], p["x"]
        loss_sum = t.zeros(())
        t0 = time.perf_counter()
        for _ in range(a["steps"]):
            opt.zero_grad(set_to_none=True)
            with t.autocast("cpu", dtype=t.bfloat16, enabled=self.bf16):
                loss = self.loss_fn(fwd(x), self.y)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        float(loss_sum)
        return {"seconds": time.perf_counter() - t0}

    def eval(self, a):
        """Inference (eager peers only: a compiled peer would compile a second graph for it)."""
        t = self.torch
        p = self.peers[a.get("peer", "eager_nchw")]
        m = p["model"]
        m.eval()
        t0 = time.perf_counter()
        with t.inference_mode(), t.autocast("cpu", dtype=t.bfloat16, enabled=self.bf16):
            for _ in range(a["steps"]):
                out = m(p["x"])
        float(out.sum())
        return {"seconds": time.perf_counter() - t0}

    def matmul(self, a):
        t = self.torch
        n = a["n"]
        x, y = t.rand(n, n), t.rand(n, n)
        return {"times": _time_op(lambda: t.mm(x, y), a)}


def worker_main(kind: str) -> None:
    # Anything the libraries print goes to stderr; stdout carries only our tagged replies.
    sys.stdout = sys.stderr
    w = MXWorker() if kind == "mxnet" else TorchWorker()
    for line in sys.__stdin__:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            _reply({"ok": True, **getattr(w, cmd["op"])(cmd)})
        except Exception as exc:  # reported to the driver, which stops
            import traceback
            traceback.print_exc()
            _reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


# ------------------------------------------------------------------------------------------------
# driver
class Worker:
    """A worker process. With `Worker.pause_idle` (the default), every call first stops all other
    live workers (SIGSTOP) and continues this one (SIGCONT): only the process being timed runs."""

    live: list = []
    pause_idle = True

    def __init__(self, kind: str, env=None, capture: bool = False):
        self.kind, self.capture, self.lines, self.stopped = kind, capture, [], False
        self.p = subprocess.Popen([sys.executable, __file__, "worker", kind], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=None, text=True,
                                  env={**os.environ, **(env or {})})
        Worker.live.append(self)

    def _signal(self, stop: bool) -> None:
        if self.stopped != stop and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGSTOP if stop else signal.SIGCONT)
            self.stopped = stop

    def __call__(self, op: str, **kw):
        if Worker.pause_idle:
            for w in Worker.live:
                if w is not self:
                    w._signal(True)
        self._signal(False)
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith(TAG):
                r = json.loads(line[len(TAG):])
                if not r.pop("ok"):
                    raise RuntimeError(f"{self.kind} worker: {op}: {r['error']}")
                return r
            if self.capture:
                self.lines.append(line.rstrip("\n"))
        raise RuntimeError(f"{self.kind} worker died during {op}")

    def close(self):
        self._signal(False)
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            self.p.wait(timeout=120)
        finally:
            if self in Worker.live:
                Worker.live.remove(self)


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": model, "isa": cpu_facts()["isa"], "cores": len(os.sched_getaffinity(0)),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "mem_gib": round(mem, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


# ------------------------------------------------------------------------------------------------
# the theoretical peak
def cpu_facts() -> dict:
    """What /proc/cpuinfo and lscpu say about the first CPU."""
    facts = {"vendor": "", "family": -1, "model": -1, "model_name": "", "flags": [], "mhz": 0.0}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        first = ""
    for line in first.splitlines():
        key, _, val = (x.strip() for x in line.partition(":"))
        if key == "vendor_id":
            facts["vendor"] = val
        elif key == "cpu family":
            facts["family"] = int(val)
        elif key == "model":
            facts["model"] = int(val)
        elif key == "model name":
            facts["model_name"] = val
        elif key == "flags":
            facts["flags"] = val.split()
        elif key == "cpu MHz":
            facts["mhz"] = float(val)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        facts["lscpu"] = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())
                          if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                                           "Socket(s)", "Hypervisor vendor", "CPU max MHz", "BogoMIPS")}
    except (OSError, subprocess.SubprocessError):
        facts["lscpu"] = {}
    facts["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
                    if f in facts["flags"]]
    return facts


def fma_table(f: dict):
    """(FMA units per core, fp32 lanes per unit, why) for the core this is, from family/model/flags.

    Lanes are what one unit completes per cycle: a 512-bit FMA split into two 256-bit halves
    (Zen 4, Zen 5 mobile) counts as 8 lanes, not 16."""
    fam, mod, fl = f["family"], f["model"], set(f["flags"])
    if f["vendor"] == "AuthenticAMD":
        if fam == 0x1A:
            if 0x20 <= mod <= 0x2F or 0x60 <= mod <= 0x6F:
                return 2, 8, "AMD Zen 5 mobile (family 1Ah model %#x): 2 FMA pipes, 256-bit datapath" % mod
            return 2, 16, ("AMD Zen 5 (family 1Ah model %#x): 2 FMA pipes with a native 512-bit datapath"
                           % mod)
        if fam == 0x19:
            if "avx512f" in fl:
                return 2, 8, "AMD Zen 4 (family 19h with AVX-512): 2 x 256-bit FMA pipes, 512-bit ops double-pumped"
            return 2, 8, "AMD Zen 3 (family 19h): 2 x 256-bit FMA pipes"
        if fam == 0x17:
            if mod >= 0x30:
                return 2, 8, "AMD Zen 2 (family 17h model >= 30h): 2 x 256-bit FMA pipes"
            return 2, 4, "AMD Zen/Zen+ (family 17h): 2 x 128-bit FMA pipes (256-bit ops split)"
    if "avx512f" in fl:
        return 2, 16, "AVX-512 (assumed 2 x 512-bit FMA units, as Xeon Gold/Platinum; some parts have 1)"
    if "fma" in fl and "avx2" in fl:
        return 2, 8, "AVX2 + FMA (assumed 2 x 256-bit FMA units)"
    return 1, 4, "no FMA flags: assumed 1 x 128-bit unit"


def run_probe(threads: int, out_dir: Path):
    """Compile and run peak.c (clock + FMA throughput per thread); None without a C compiler."""
    exe = out_dir / ".peak"
    src = HERE / "peak.c"
    try:
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            out_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([os.environ.get("CC", "cc"), "-O2", "-pthread", str(src), "-o", str(exe)],
                           check=True, capture_output=True, timeout=120)
        out = subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True,
                             timeout=300).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"# peak probe unavailable ({type(exc).__name__}: {exc}); falling back to the reported MHz")
        return None


def theoretical_peak(threads: int, out_dir: Path) -> dict:
    """cores x FMA units x fp32 lanes x 2 FLOP x clock, each factor with where it came from."""
    f = cpu_facts()
    units, lanes, why = fma_table(f)
    probe = run_probe(threads, out_dir)
    tsc_hz = f["mhz"] * 1e6
    notes = [why]
    if probe:
        clock = max([p["clock_hz"] for p in probe] + [tsc_hz])
        fma = max(max(p["fma512_flops"], p["fma256_flops"]) for p in probe)
        measured_fpc = fma / clock
        clock_src = (f"measured: a chain of dependent adds ran at {max(p['clock_hz'] for p in probe) / 1e9:.3f} GHz "
                     f"per thread ({threads} thread(s) at once; /proc/cpuinfo reports {f['mhz']:.0f} MHz, "
                     f"the TSC rate a KVM guest sees); the higher of the two is used")
    else:
        clock, measured_fpc, fma = tsc_hz, None, None
        clock_src = (f"assumed: the {f['mhz']:.0f} MHz /proc/cpuinfo reports (in a VM that is the TSC rate; "
                     "a boost clock above it would put shares too high)")
    fpc = 2 * units * lanes
    if fma and fma / fpc > clock:
        # The FMA loop ran faster than the table allows at the measured clock: the add chain
        # read the clock low (it is timed separately). Take the clock the FMA rate implies, so
        # that no measured rate exceeds the peak.
        notes.append(f"clock raised from {clock / 1e9:.3f} to {fma / fpc / 1e9:.3f} GHz: the FMA loop's rate "
                     f"/ {fpc} FLOP per cycle")
        clock = fma / fpc
        measured_fpc = fma / clock
    if measured_fpc and measured_fpc > 1.1 * fpc:
        units, lanes = 2, int(2 ** round(__import__("math").log2(measured_fpc / 4)))
        fpc = 2 * units * lanes
        notes.append(f"the table underestimated this core: measured {measured_fpc:.1f} FLOP/cycle, "
                     f"using {fpc}")
    per_core = fpc * clock
    return {"cpu": f["model_name"], "family": f["family"], "model": f["model"], "isa_flags": f["isa"],
            "lscpu": f.get("lscpu", {}), "tsc_mhz": f["mhz"], "clock_hz": clock, "clock_source": clock_src,
            "fma_units": units, "fp32_lanes": lanes, "flop_per_cycle": fpc, "notes": notes,
            "measured_fma_flops_per_thread": fma, "measured_flop_per_cycle": measured_fpc, "probe": probe,
            "threads": threads, "cores": len(os.sched_getaffinity(0)),
            "peak_gflops": threads * per_core / 1e9,
            "machine_peak_gflops": len(os.sched_getaffinity(0)) * per_core / 1e9}


def bf16_peak(pk: dict) -> tuple:
    """The theoretical bfloat16 peak (GFLOP/s) and how it was derived from the fp32 one: AMX's
    tile unit does 1,024 bf16 multiply-adds per cycle per core (Intel's optimization manual,
    TDPBF16PS), 32x the 2 x 16 fp32 FMA lanes; AVX512-BF16's VDPBF16PS does two per fp32 lane, 2x.
    The clock is the fp32 one (AMX may run below it, so shares err low, not above 100%)."""
    flags = set(pk["isa_flags"])
    if "amx_bf16" in flags:
        per_cycle = 2 * 1024
        why = "AMX: 1,024 bf16 multiply-adds per cycle per core (TDPBF16PS)"
    elif "avx512_bf16" in flags:
        per_cycle = 2 * pk["flop_per_cycle"]
        why = "AVX512-BF16: VDPBF16PS, 2 bf16 multiply-adds per fp32 lane, 2x the fp32 rate"
    else:
        per_cycle = pk["flop_per_cycle"]
        why = "no bfloat16 arithmetic: oneDNN converts to fp32, the fp32 rate"
    return pk["threads"] * per_cycle * pk["clock_hz"] / 1e9, f"{pk['threads']} core(s) x {per_cycle} FLOP/cycle x " \
        f"{pk['clock_hz'] / 1e9:.3f} GHz ({why})"


def print_peak(pk: dict) -> None:
    print(f"# theoretical fp32 peak: {pk['threads']} core(s) x {pk['fma_units']} FMA units x {pk['fp32_lanes']} "
          f"fp32 lanes x 2 FLOP x {pk['clock_hz'] / 1e9:.3f} GHz = {pk['peak_gflops']:.1f} GFLOP/s "
          f"(whole machine, {pk['cores']} cores: {pk['machine_peak_gflops']:.1f})", flush=True)
    print(f"#   CPU: {pk['cpu']}, family {pk['family']} model {pk['model']}, flags {' '.join(pk['isa_flags'])}; "
          f"lscpu: {pk['lscpu']}")
    print(f"#   units/lanes: {'; '.join(pk['notes'])}")
    print(f"#   clock: {pk['clock_source']}")
    if pk["measured_flop_per_cycle"]:
        print(f"#   check: an FMA loop (12 independent accumulators) reached "
              f"{pk['measured_fma_flops_per_thread'] / 1e9:.1f} GFLOP/s per thread = "
              f"{pk['measured_flop_per_cycle']:.1f} FLOP/cycle (table: {pk['flop_per_cycle']})", flush=True)


MATMUL_SIZES = (256, 512, 1024, 2048, 4096)


def matmuls(mxw, thw, sizes=MATMUL_SIZES, rounds: int = 2) -> dict:
    """fp32 n x n products in MXNet (OpenBLAS dot, oneDNN inner product) and PyTorch (MKL mm),
    interleaved; GFLOP/s of the median time per size and backend."""
    times = {}
    for _ in range(rounds):
        for n in sizes:
            for name, w, kw in (("mxnet_dot_openblas", mxw, {"backend": "dot"}),
                                ("mxnet_fc_onednn", mxw, {"backend": "onednn"}),
                                ("torch_mm_mkl", thw, {})):
                times.setdefault(name, {}).setdefault(n, []).extend(
                    w("matmul", n=n, reps=3, seconds=0.3, **kw)["times"])
    return {name: {n: 2 * n ** 3 / _med(v) / 1e9 for n, v in by_n.items()} for name, by_n in times.items()}


def onednn_report(size: int = 32, bn: bool = True, batch: int = 128, amp_bf16: bool = False, steps: int = 2,
                  net: str = "vgg11") -> dict:
    """Run `steps` training steps in a fresh MXNet worker with MKLDNN_VERBOSE=1 and summarize which
    oneDNN implementation ran for each primitive (the last step only: no creation noise)."""
    w = Worker("mxnet", env={"MKLDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}, capture=True)
    try:
        w("setup", size=size, bn=bn, batch=batch, amp_bf16=amp_bf16, net=net)
        w("train", steps=steps, data="synthetic")
        w("flush")
        info = [ln for ln in w.lines if ln.startswith("dnnl_verbose,info")]
        w.lines.clear()
        w("train", steps=1, data="synthetic")
        w("flush")
        lines = [ln for ln in w.lines if ln.startswith("dnnl_verbose")]
    finally:
        w.close()
    kinds: Counter = Counter()
    ms: Counter = Counter()
    for ln in lines:
        parts = ln.split(",")
        if len(parts) > 6 and parts[1] == "exec":
            dtypes = sorted(set(re.findall(r"(?:src|data|wei|dst|diff)_([a-z0-9]+)::", parts[6])) - {"undef"})
            key = (parts[3], parts[4], parts[5], "/".join(dtypes))
            kinds[key] += 1
            try:
                ms[key] += float(parts[-1])
            except ValueError:
                pass
    return {"info": info, "exec": [{"primitive": k[0], "impl": k[1], "prop": k[2], "dtypes": k[3],
                                    "count": c, "ms": round(ms[k], 3)} for k, c in kinds.most_common()],
            "isa": next((ln.split("isa:", 1)[1] for ln in info if "isa:" in ln), "?"),
            "version": next((ln.split("info,", 1)[1] for ln in info if "oneDNN v" in ln), "?")}


def print_onednn(rep: dict, label: str) -> None:
    print(f"# oneDNN ({label}): {rep['version']}; ISA dispatched: {rep['isa']}")
    by = {}
    for e in rep["exec"]:
        by.setdefault((e["primitive"], e["impl"], e["dtypes"]), []).append(e)
    total = sum(e["ms"] for e in rep["exec"]) or 1.0
    for (prim, impl, dt), es in sorted(by.items(), key=lambda kv: -sum(e["ms"] for e in kv[1])):
        props = ",".join(sorted({e["prop"] for e in es}))
        n, t = sum(e["count"] for e in es), sum(e["ms"] for e in es)
        print(f"#   {prim:<20} {impl:<22} {dt:<10} {props:<48} x{n:<3} {t:8.2f} ms ({t / total:.0%})")


def _range(xs):
    return f"{min(xs):.1f}-{max(xs):.1f}"


def within_noise(a: list, b: list) -> bool:
    """Two series of chunk rates agree within the noise when either median lies inside the other
    series' min-max range."""
    return min(a) <= _med(b) <= max(a) or min(b) <= _med(a) <= max(b)


def _med(xs):
    return statistics.median(xs)


# Steps per timed chunk and chunks per size: 224 px steps take seconds, so fewer of them.
PLAN = {32: (10, 5), 96: (3, 5), 224: (1, 5)}
PLAN_QUICK = {32: (4, 3), 96: (1, 3), 224: (1, 3)}


def _rates(times_per_step: list, batch: int) -> list:
    return [batch / t for t in times_per_step]


def alone_check(mxw, thw, setup: dict, peers: list, k: int, rounds: int) -> dict:
    """Each framework's bench worker against a fresh process of the same framework that has never
    run beside the other framework ("alone"), chunk for chunk in alternation (everything else
    stopped), so that a change of the machine's load hits both sides of every comparison."""
    mxa, tha = Worker("mxnet"), Worker("torch")
    try:
        mxa("setup", **setup)
        tha("setup", **setup, peers=peers)
        calls = {}
        for n in ["mx_syn", *peers]:
            if n == "mx_syn":
                calls[n] = {"bench": lambda kk: mxw("train", steps=kk, data="synthetic")["seconds"],
                            "alone": lambda kk: mxa("train", steps=kk, data="synthetic")["seconds"]}
            else:
                calls[n] = {"bench": lambda kk, n=n: thw("train", steps=kk, peer=n)["seconds"],
                            "alone": lambda kk, n=n: tha("train", steps=kk, peer=n)["seconds"]}
            calls[n]["alone"](max(k, 2))  # warm-up (compiles), as in the bench
            calls[n]["alone"](k)
        t = {n: {"bench": [], "alone": []} for n in calls}
        for r in range(rounds):
            for n, c in calls.items():
                for who in (("bench", "alone") if r % 2 == 0 else ("alone", "bench")):
                    t[n][who].append(c[who](k) / k)
    finally:
        mxa.close()
        tha.close()
    return t


def throughput(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = [bn == "bn" for bn in args.variants.split(",")]
    if args.net == "fast3":
        variants = [True]  # fast3 has BatchNorm in every block
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}; choose from {','.join(PEERS)}")
    plan = PLAN_QUICK if args.quick else PLAN
    res = {"machine": machine(), "command": " ".join(sys.argv), "runs": [], "peers": peers,
           "precision": args.precision,
           "pause_idle": Worker.pause_idle, "wait_policy": args.wait_policy}
    threads = int(os.environ["OMP_NUM_THREADS"])
    print(f"# {res['machine']}", flush=True)
    fair = ("the idle workers are stopped (SIGSTOP) while one is timed" if Worker.pause_idle
            else "NO pausing (the old method)")
    print(f"# fairness: {fair}; OpenMP wait policy: {args.wait_policy}", flush=True)
    pk = theoretical_peak(threads, Path(args.out))
    res["peak"] = pk
    print_peak(pk)
    mxw, thw = Worker("mxnet"), Worker("torch")
    try:
        res["mxnet"], res["torch"] = mxw("info"), thw("info")
        print(f"# mxnet {res['mxnet']}\n# torch {res['torch']}", flush=True)
        mm = matmuls(mxw, thw, sizes=(512, 1024, 2048) if args.quick else MATMUL_SIZES)
        res["matmul_gflops"] = mm
        best = max(((g, name, n) for name, by_n in mm.items() for n, g in by_n.items()))
        res["best_matmul"] = {"gflops": best[0], "backend": best[1], "n": best[2],
                              "share_of_peak": best[0] / pk["peak_gflops"]}
        for name, by_n in mm.items():
            print(f"matmul fp32 {name:<19} " + "  ".join(f"{n}: {g:6.1f}" for n, g in by_n.items()) + " GFLOP/s",
                  flush=True)
        print(f"best measured matrix product: {best[0]:.1f} GFLOP/s ({best[1]}, n={best[2]}) = "
              f"{best[0] / pk['peak_gflops']:.0%} of the theoretical {pk['peak_gflops']:.1f}", flush=True)
        bf16 = args.precision == "bf16"
        peak = pk["peak_gflops"]
        if bf16:
            peak, how = bf16_peak(pk)
            res["peak_bf16"] = {"gflops": peak, "derivation": how}
            print("# precision bf16: MXNet AMP bfloat16 against PyTorch autocast bfloat16, float32 weights on both "
                  f"sides; every share of peak below is of the theoretical bfloat16 peak {peak:.1f} GFLOP/s = "
                  f"{how}", flush=True)
        if args.onednn:
            rep = onednn_report(batch=args.batch, net=args.net, amp_bf16=bf16)
            res["onednn"] = rep
            print_onednn(rep, f"MXNet, one training step, {args.net}, 32 px BN")
        for size in sizes:
            k, rounds = plan[size]
            for bn in variants:
                setup = dict(size=size, bn=bn, batch=args.batch, fc_units=args.fc_units, net=args.net,
                             **({"amp_bf16": True} if bf16 else {}))
                info = mxw("setup", **setup)
                thw("setup", **setup, peers=peers)
                b = args.batch
                fl = 3 * 2 * info["macs"]  # training FLOP per image
                # warm-up: hybridize/graph build, oneDNN primitive creation, torch.compile
                mxw("train", steps=max(k, 2), data="synthetic")
                mxw("train", steps=max(k, 2), data="real")
                for p in peers:
                    thw("train", steps=max(k, 2), peer=p)
                    thw("train", steps=k, peer=p)
                series = ["mx_syn", "mx_real", *peers]
                t = {n: [] for n in series}
                for r in range(rounds):
                    order = series[r % len(series):] + series[:r % len(series)]
                    for name in order:
                        if name == "mx_syn":
                            sec = mxw("train", steps=k, data="synthetic")["seconds"]
                        elif name == "mx_real":
                            sec = mxw("train", steps=k, data="real")["seconds"]
                        else:
                            sec = thw("train", steps=k, peer=name)["seconds"]
                        t[name].append(sec / k)
                ips = {n: b / _med(v) for n, v in t.items()}
                rates = {n: _rates(v, b) for n, v in t.items()}
                pair = {p: [tp / tm for tp, tm in zip(t[p], t["mx_syn"])] for p in peers}
                fastest = max(peers, key=lambda p: ips[p]) if peers else None
                ev = {"mx": []}
                ev.update({p: [] for p in peers if p.startswith("eager")})
                for _ in range(rounds):
                    ev["mx"].append(mxw("eval", steps=k)["seconds"] / k)
                    for p in ev:
                        if p != "mx":
                            ev[p].append(thw("eval", steps=k, peer=p)["seconds"] / k)
                eips = {n: b / _med(v) for n, v in ev.items()}
                pipe_s = mxw("pipeline", steps=12)["seconds"]
                row = {"size": size, "bn": bn, "batch": b, "steps_per_chunk": k, "chunks": rounds,
                       "macs": info["macs"], "img_s": ips, "img_s_chunks": rates, "eval_img_s": eips,
                       "fastest_peer": fastest,
                       "ratio_vs_fastest": ips["mx_syn"] / ips[fastest] if fastest else None,
                       "pair_ratios": pair,
                       "ratio_vs_peer": {p: ips["mx_syn"] / ips[p] for p in peers},
                       "real_vs_synthetic": ips["mx_real"] / ips["mx_syn"],
                       "train_gflops": {n: fl * v / 1e9 for n, v in ips.items()},
                       "share_of_peak": {n: fl * v / 1e9 / peak for n, v in ips.items()},
                       "pipeline_ms_per_batch": 1000 * pipe_s,
                       "pipeline_share_of_step": pipe_s / _med(t["mx_syn"]),
                       "raw_step_s": t, "raw_eval_s": ev}
                tag = (f"{size:>3}px {'BN   ' if bn else 'no-BN'}" + (" fast3" if args.net == "fast3" else "")
                       + (" bf16" if bf16 else ""))
                print(f"{tag} MXNet (ours)  {ips['mx_syn']:8.1f} img/s [{_range(rates['mx_syn'])}]  "
                      f"{fl * ips['mx_syn'] / 1e9:6.1f} GFLOP/s = {ips['mx_syn'] * fl / 1e9 / peak:.0%} of peak;  "
                      f"real data {ips['mx_real']:.1f} ({row['real_vs_synthetic']:.0%})", flush=True)
                for p in peers:
                    print(f"{tag} PyTorch {PEER_LABEL[p]:<28} {ips[p]:8.1f} img/s [{_range(rates[p])}]  "
                          f"{fl * ips[p] / 1e9 / peak:.0%} of peak;  ours/this {ips['mx_syn'] / ips[p]:.2f}x "
                          f"(pairs {min(pair[p]):.2f}-{max(pair[p]):.2f})", flush=True)
                if fastest:
                    print(f"{tag} => ratio against the fastest peer ({PEER_LABEL[fastest]}): "
                          f"{row['ratio_vs_fastest']:.2f}x, pair ratios {min(pair[fastest]):.2f}-"
                          f"{max(pair[fastest]):.2f} ({len(pair[fastest])} pairs)", flush=True)
                print(f"{tag} eval img/s: " + ", ".join(
                    f"{'MXNet' if n == 'mx' else PEER_LABEL[n]} {v:.1f}" for n, v in eips.items())
                    + f";  data pipeline alone {1000 * pipe_s:.1f} ms/batch = "
                    f"{row['pipeline_share_of_step']:.1%} of a synthetic step", flush=True)
                if args.alone and peers:
                    load0 = os.getloadavg()[0]
                    alone = alone_check(mxw, thw, setup, peers, k, rounds)
                    row["alone_step_s"] = alone
                    checks = {}
                    for n in ["mx_syn", *peers]:
                        a_r, b_r = _rates(alone[n]["alone"], b), _rates(alone[n]["bench"], b)
                        pr = [x / y for x, y in zip(b_r, a_r)]
                        ok = within_noise(b_r, a_r)
                        checks[n] = {"alone_img_s": _med(a_r), "bench_worker_img_s": _med(b_r),
                                     "bench_img_s": ips[n], "pair_ratios": pr, "within_noise": ok}
                        label = "MXNet (ours)" if n == "mx_syn" else "PyTorch " + PEER_LABEL[n]
                        verdict = "within the noise" if ok else "OUTSIDE the noise"
                        print(f"{tag} alone check {label:<36} bench worker {_med(b_r):8.1f} [{_range(b_r)}]  "
                              f"fresh process alone {_med(a_r):8.1f} [{_range(a_r)}]  "
                              f"ratio {_med(b_r) / _med(a_r):.2f} (pairs {min(pr):.2f}-{max(pr):.2f})  {verdict}"
                              f"  [bench figure above: {ips[n]:.1f}]", flush=True)
                    row["alone_check"] = checks
                    row["alone_check_load"] = [load0, os.getloadavg()[0]]
                res["runs"].append(row)
        if args.epoch and 32 in sizes:
            mxw("setup", size=32, bn=True, batch=args.batch, fc_units=args.fc_units, net=args.net)
            mxw("train", steps=4, data="synthetic")
            # Real epochs alternate with sets of synthetic chunks; each epoch is compared with the
            # synthetic rate just before and after it, and the median ratio is reported.
            def syn_set():
                return [mxw("train", steps=10, data="synthetic")["seconds"] / 10 for _ in range(3)]
            sets, epochs = [syn_set()], []
            for _ in range(max(1, args.real_epochs)):
                epochs.append(mxw("epoch_real"))
                sets.append(syn_set())
            ev = mxw("eval_real")
            per = []
            for i, ep in enumerate(epochs):
                syn_ips = args.batch / _med(sets[i] + sets[i + 1])
                ep_ips = ep["images"] / ep["seconds"]
                per.append({"img_s": ep_ips, "seconds": ep["seconds"], "synthetic_img_s": syn_ips,
                            "ratio": ep_ips / syn_ips})
            ratio = _med([e["ratio"] for e in per])
            res["real_epoch_32_bn"] = {"epochs": per, "ratio": ratio,
                                       "eval_real_img_s": ev["images"] / ev["seconds"], "eval_seconds": ev["seconds"]}
            each = ", ".join(f"{e['img_s']:.1f} img/s in {e['seconds']:.1f} s = {e['ratio']:.0%} of "
                             f"{e['synthetic_img_s']:.1f}" for e in per)
            print(f"real-data epochs 32px BN (shuffle, crop+flip, metrics), each against the synthetic rate "
                  f"bracketing it: {each}; median {ratio:.0%}; "
                  f"evaluate() on the 10,000 test images: {ev['images'] / ev['seconds']:.1f} img/s", flush=True)
    finally:
        mxw.close()
        thw.close()
    res["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print("# summary (img/s medians; ratio = ours / fastest peer, [min-max of the pair ratios]; "
          "share = training GFLOP/s / theoretical peak)")
    for row in res["runs"]:
        f = row["fastest_peer"]
        alone = row.get("alone_check", {})
        ok = sum(c["within_noise"] for c in alone.values())
        print(f"#  {row['size']:>3}px {'BN   ' if row['bn'] else 'no-BN'} ours {row['img_s']['mx_syn']:8.1f}  "
              f"fastest peer {PEER_LABEL[f] if f else '-'} {row['img_s'][f] if f else 0:8.1f}  "
              f"ratio {row['ratio_vs_fastest'] or 0:.2f}x [{min(row['pair_ratios'][f]) if f else 0:.2f}-"
              f"{max(row['pair_ratios'][f]) if f else 0:.2f}]  share ours {row['share_of_peak']['mx_syn']:.0%} / "
              f"peer {row['share_of_peak'][f] if f else 0:.0%}"
              + (f"  alone check: {ok} of {len(alone)} within the noise" if alone else ""), flush=True)
    print(f"# load average at the end: {res['machine']['load_avg_end']}")
    return res


def syncs(args) -> dict:
    """Per-step costs inside train_one_epoch, measured as interleaved A/B pairs in one worker."""
    import itertools
    res = {"machine": machine(), "command": " ".join(sys.argv)}
    w = Worker("mxnet")
    try:
        w("setup", size=32, bn=True, batch=args.batch, fc_units=args.fc_units)
        w("train", steps=10, data="synthetic")
        variants = ["default", "no_seed", "no_nan_read", "neither"]
        print(f"# load {os.getloadavg()}", flush=True)
        t = {v: [] for v in variants}
        for r, v in itertools.product(range(args.rounds), variants):
            t[v].append(w("variant", variant=v, steps=args.steps)["seconds"] / args.steps)
            print(f"  round {r} {v}: {1000 * t[v][-1]:.1f} ms/step", flush=True)
        res["ms_per_step"] = {v: 1000 * _med(x) for v, x in t.items()}
        res["raw"] = t
        for v in variants:
            print(f"{v:>12}: {1000 * _med(t[v]):7.2f} ms/step ({args.batch / _med(t[v]):.0f} img/s)")
    finally:
        w.close()
    return res


def threads(args) -> dict:
    """MXNet synthetic 32/96 px training img/s under thread/engine settings, interleaved rounds."""
    settings = {
        "omp1": {"OMP_NUM_THREADS": "1"},
        "omp2": {"OMP_NUM_THREADS": "2"},
        "omp2_workers2": {"OMP_NUM_THREADS": "2", "MXNET_CPU_WORKER_NTHREADS": "2"},
        "omp2_bind": {"OMP_NUM_THREADS": "2", "OMP_PROC_BIND": "true", "OMP_PLACES": "cores"},
        "omp2_active": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "active"},
        "omp2_passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"},
        "omp2_nobulk": {"OMP_NUM_THREADS": "2", "MXNET_EXEC_BULK_EXEC_TRAIN": "0"},
        "omp2_naive": {"OMP_NUM_THREADS": "2", "MXNET_ENGINE_TYPE": "NaiveEngine"},
    }
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only.split(",")}
    res = {"machine": machine(), "command": " ".join(sys.argv), "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        k, rounds = {32: (10, 5), 96: (2, 5), 224: (1, 3)}[size]
        workers = {}
        try:
            for name, env in settings.items():
                workers[name] = Worker("mxnet", env)
                workers[name]("setup", size=size, bn=True, batch=args.batch, fc_units=args.fc_units)
                workers[name]("train", steps=max(k, 2), data="synthetic")
            t = {n: [] for n in settings}
            for _ in range(rounds):
                for name, w in workers.items():
                    t[name].append(w("train", steps=k, data="synthetic")["seconds"] / k)
            ips = {n: args.batch / _med(v) for n, v in t.items()}
            res["sizes"][size] = ips
            for n, v in ips.items():
                print(f"{size:>3}px {n:>15}: {v:7.1f} img/s", flush=True)
        finally:
            for w in workers.values():
                w.close()
    return res


# name -> (environment of the worker, setup overrides). "base" is the product's default.
LEVERS = {
    "base": ({}, {}),
    "ctx2_omp1": ({"OMP_NUM_THREADS": "1"}, {"ctx": "cpu:0,1"}),   # two single-thread replicas
    "omp1": ({"OMP_NUM_THREADS": "1"}, {}),                        # one context, one thread
    "omp1_b64": ({"OMP_NUM_THREADS": "1"}, {"batch": 64}),         # what each replica does
    "ctx2_omp2": ({}, {"ctx": "cpu:0,1"}),                         # two replicas, product threads
    "ctx2_omp1_static": ({"OMP_NUM_THREADS": "1"}, {"ctx": "cpu:0,1", "static_alloc": True}),
    # All CPU contexts share one pool of MXNET_CPU_TEMP_COPY (default 4) temp-space buffers, and
    # operators that draw the same buffer wait for each other: the replicas then run one at a time.
    "ctx2_omp1_temp64": ({"OMP_NUM_THREADS": "1", "MXNET_CPU_TEMP_COPY": "64"}, {"ctx": "cpu:0,1"}),
    "temp64": ({"MXNET_CPU_TEMP_COPY": "64"}, {}),
    # Inter-operator parallelism in one context (same operators, same results): two engine
    # workers, one OpenMP thread each.
    "omp1_workers2": ({"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "2"}, {}),
    "omp1_workers2_temp64": ({"OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "2",
                              "MXNET_CPU_TEMP_COPY": "64"}, {}),
    "omp2_workers2": ({"MXNET_CPU_WORKER_NTHREADS": "2"}, {}),
    "agg1": ({"MXNET_OPTIMIZER_AGGREGATION_SIZE": "1"}, {}),       # no multi_sgd_mom_update
    "agg60": ({"MXNET_OPTIMIZER_AGGREGATION_SIZE": "60"}, {}),     # one update call for all params
    "nobulk": ({"MXNET_EXEC_BULK_EXEC_TRAIN": "0"}, {}),
    "bulk60": ({"MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_FWD": "60",
                "MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_BWD": "60"}, {}),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    "b64": ({}, {"batch": 64}),
    "b256": ({}, {"batch": 256}),
    "bf16": ({}, {"amp_bf16": True}),
    "bf16_conv": ({}, {"amp_bf16": "conv"}),
}


def levers(args) -> dict:
    """MXNet training img/s (synthetic batches, train_one_epoch) under each lever, one worker per
    lever, interleaved chunks with the idle workers stopped; ratio to "base" with pair spread."""
    names = [n for n in (args.only.split(",") if args.only else LEVERS) if n]
    if "base" not in names:
        names = ["base", *names]
    res = {"machine": machine(), "command": " ".join(sys.argv), "sizes": {}}
    print(f"# {res['machine']}", flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        k, rounds = {32: (10, args.rounds), 96: (3, args.rounds), 224: (1, args.rounds)}[size]
        if args.quick:
            k = max(1, k // 2)
        workers, batch = {}, {}
        try:
            for name in names:
                env, over = LEVERS[name]
                setup = {"size": size, "bn": args.variants != "nobn", "batch": args.batch,
                         "fc_units": args.fc_units, **over}
                batch[name] = setup["batch"]
                workers[name] = Worker("mxnet", env)
                info = workers[name]("setup", **setup)
                workers[name]("train", steps=max(k, 2), data="synthetic")
                workers[name]("train", steps=k, data="synthetic")
                print(f"# {name}: env {env} setup {over} contexts {info['ctx']}", flush=True)
            t = {n: [] for n in names}
            busy = {n: [] for n in names}  # CPU seconds of the worker per wall second: cores kept busy
            for r in range(rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    out = workers[name]("train", steps=k, data="synthetic")
                    t[name].append(out["seconds"] / k)
                    busy[name].append(out["cpu_seconds"] / out["seconds"])
            ips = {n: batch[n] / _med(v) for n, v in t.items()}
            pair = {n: [(batch[n] / tn) / (batch["base"] / tb) for tn, tb in zip(t[n], t["base"])] for n in names}
            res["sizes"][size] = {"img_s": ips, "pair_ratio_to_base": pair, "raw_step_s": t, "batch": batch,
                                  "cores_busy": busy}
            for n in names:
                rates = _rates(t[n], batch[n])
                print(f"{size:>3}px {n:>20}: {ips[n]:8.1f} img/s [{_range(rates)}]  vs base "
                      f"{ips[n] / ips['base']:.2f}x (pairs {min(pair[n]):.2f}-{max(pair[n]):.2f})  "
                      f"cores busy {_med(busy[n]):.2f}", flush=True)
        finally:
            for w in workers.values():
                w.close()
    res["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"# load average at the end: {res['machine']['load_avg_end']}")
    return res


def onednn(args) -> dict:
    """Which oneDNN kernels one MXNet training step runs (float32, and AMP bfloat16 with --bf16)."""
    res = {"machine": machine(), "command": " ".join(sys.argv), "reports": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        for bf16 in ([False, True, "conv"] if args.bf16 else [False]):
            rep = onednn_report(size=size, bn=args.variants != "nobn", batch=args.batch, amp_bf16=bf16)
            label = f"{size} px, " + {False: "float32", True: "AMP bfloat16",
                                      "conv": "AMP bfloat16, convolutions only"}[bf16]
            res["reports"][label] = rep
            print_onednn(rep, label)
    return res


def peak_only(args) -> dict:
    threads = int(os.environ["OMP_NUM_THREADS"])
    res = {"machine": machine(), "command": " ".join(sys.argv)}
    print(f"# {res['machine']}", flush=True)
    res["peak"] = pk = theoretical_peak(threads, Path(args.out))
    print_peak(pk)
    mxw, thw = Worker("mxnet"), Worker("torch")
    try:
        res["matmul_gflops"] = mm = matmuls(mxw, thw)
    finally:
        mxw.close()
        thw.close()
    for name, by_n in mm.items():
        print(f"matmul fp32 {name:<19} " + "  ".join(f"{n}: {g:6.1f} ({g / pk['peak_gflops']:.0%})"
                                                     for n, g in by_n.items()) + " GFLOP/s (share of peak)")
    res["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return res


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["throughput", "levers", "onednn", "peak", "syncs", "threads"])
    ap.add_argument("--sizes", default="32,96,224")
    ap.add_argument("--variants", default="bn,nobn", help="bn, nobn or both")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"PyTorch peers, any of {','.join(PEERS)}")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--net", choices=["vgg11", "fast3"], default="vgg11",
                    help="vgg11: VGG-11 x0.25 on Fashion-MNIST (the figures since 2026-11-22); fast3: the "
                         "CIFAR-10 default recipe's network and optimizer on CIFAR-10 (use --batch 512)")
    ap.add_argument("--fc-units", type=int, default=None, help="default 4096 x width = 1024")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per chunk (syncs)")
    ap.add_argument("--only", default="", help="threads/levers: comma-separated names")
    ap.add_argument("--quick", action="store_true", help="fewer steps per chunk (a smoke test)")
    ap.add_argument("--no-pause", dest="pause", action="store_false",
                    help="do not stop the idle worker while another is timed (the old, unfair method)")
    ap.add_argument("--wait-policy", choices=["default", "passive"], default="default",
                    help="passive: OMP_WAIT_POLICY=PASSIVE and KMP_BLOCKTIME=0 in every worker")
    ap.add_argument("--no-alone", dest="alone", action="store_false",
                    help="skip timing each framework again in a process of its own")
    ap.add_argument("--no-onednn", dest="onednn", action="store_false", help="skip the oneDNN verbose report")
    ap.add_argument("--bf16", action="store_true", help="onednn: also run MXNet AMP bfloat16")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="throughput: bf16 times MXNet AMP bfloat16 against PyTorch autocast bfloat16 "
                         "(AMX where the CPU has it)")
    ap.add_argument("--no-epoch", dest="epoch", action="store_false", help="skip the whole real-data epochs")
    ap.add_argument("--real-epochs", type=int, default=3, help="whole real-data epochs at 32 px (median reported)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    Worker.pause_idle = args.pause
    if args.wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["KMP_BLOCKTIME"] = "0"
    # The package's own thread choice (vgg_gluon._env: one OpenMP thread per core idle now, or the
    # user's OMP_NUM_THREADS / VGG_GLUON_THREADS), made once here and inherited by every worker.
    sys.path.insert(0, str(HERE.parent))
    import vgg_gluon  # noqa: F401
    print(f"# threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} for MXNet and PyTorch", flush=True)
    modes = {"throughput": throughput, "levers": levers, "onednn": onednn, "peak": peak_only,
             "syncs": syncs, "threads": threads}
    try:
        res = modes[args.mode](args)
    finally:
        for w in list(Worker.live):
            w._signal(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"# results: {path}")


if __name__ == "__main__":
    main()
