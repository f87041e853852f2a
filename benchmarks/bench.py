"""Training/evaluation throughput of vgg-gluon vs PyTorch eager on this CPU, interleaved.

    python benchmarks/bench.py throughput [--sizes 32,96,224] [--quick]
    python benchmarks/bench.py syncs        # cost of the per-step NaN read and per-step seeding
    python benchmarks/bench.py threads      # thread/engine settings sweep (MXNet only)

The driver imports neither framework. It starts two long-lived worker processes (this same file
with `worker mxnet` / `worker torch`; separate processes because both bundle their own OpenMP
runtime) and sends them one JSON command at a time, alternating MXNet and PyTorch so that any
drift in machine load hits both. Every timed unit is a "chunk" of K training steps ending in a
full synchronisation (mx.nd.waitall()); the figure per step is chunk time / K, and the reported
value is the median over >= 5 chunks after one warm-up chunk.

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
import statistics
import subprocess
import sys
import time
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
        self.dataset = None
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
        cfg = RunConfig(dataset="fashion-mnist", arch="vgg11", width=0.25, batch_norm=a["bn"],
                        fc_units=a.get("fc_units"), image_size=None if a["size"] == 32 else a["size"],
                        batch_size=a["batch"], lr=0.01, momentum=0.9, wd=5e-4, lr_schedule="cosine",
                        epochs=100, augment_crop=a.get("crop", 4), augment_flip=a.get("flip", True),
                        dropout=0.5, seed=42, ctx="cpu", hybridize=True,
                        **({"dtype": a["dtype"]} if a.get("dtype") else {}))
        if self.dataset is None:
            self.dataset = data_mod.load_dataset("fashion-mnist", None, download=False)
        self.s = self.engine.build_session(cfg, dataset=self.dataset)
        self.cfg = cfg
        shape = (a["batch"],) + tuple(self.s.input_shape)
        ctx = self.s.ctx_list
        rng = mx.random.normal(shape=shape, ctx=ctx[0])
        self.syn = ([rng], [mx.nd.array((self.mx.nd.arange(a["batch"]) % 10).asnumpy(), ctx=ctx[0])])
        self.real_pos = 0
        self.seed = a.get("seed", 42)
        macs = self.netsummary.count_macs("vgg11", 0.25, a["bn"], cfg.fc_units, 10, tuple(self.s.input_shape))
        return {"macs": macs, "steps_per_epoch": len(self.s.train_loader)}

    def _run(self, loader):
        s = self.s
        mx = self.mx
        t0 = time.perf_counter()
        self.engine.train_one_epoch(s.net, s.trainer, loader, s.loss_fn, epoch=self.epoch,
                                    num_classes=10, log_interval=10 ** 9, seed=self.seed)
        mx.nd.waitall()
        return time.perf_counter() - t0

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
        return {"seconds": self._run(loader)}

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
        mx = self.mx
        n = a["n"]
        x = mx.nd.random.uniform(shape=(n, n))
        y = mx.nd.random.uniform(shape=(n, n))
        mx.nd.dot(x, y).wait_to_read()
        times = []
        for _ in range(a["reps"]):
            t0 = time.perf_counter()
            mx.nd.dot(x, y).wait_to_read()
            times.append(time.perf_counter() - t0)
        return {"times": times}


class TorchWorker:
    def __init__(self):
        import torch
        self.torch = torch
        n = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        torch.set_num_threads(n)
        self.model = None

    def info(self, _):
        t = self.torch
        return {"torch": t.__version__, "threads": t.get_num_threads(),
                "mkldnn": t.backends.mkldnn.is_available()}

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

    def setup(self, a):
        t = self.torch
        t.manual_seed(0)
        fc = a.get("fc_units") or 1024
        self.model = self._build(a["bn"], fc)
        self.x = t.randn(a["batch"], 1, a["size"], a["size"])
        self.y = t.arange(a["batch"]) % 10
        self.model(self.x[:2])  # materialize LazyLinear
        self.opt = t.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.loss_fn = t.nn.CrossEntropyLoss()
        return {}

    def train(self, a):
        t = self.torch
        m = self.model
        m.train()
        loss_sum = t.zeros(())
        t0 = time.perf_counter()
        for _ in range(a["steps"]):
            self.opt.zero_grad(set_to_none=True)
            out = m(self.x)
            loss = self.loss_fn(out, self.y)
            loss.backward()
            self.opt.step()
            loss_sum += loss.detach()
        float(loss_sum)
        return {"seconds": time.perf_counter() - t0}

    def eval(self, a):
        t = self.torch
        m = self.model
        m.eval()
        t0 = time.perf_counter()
        with t.inference_mode():
            for _ in range(a["steps"]):
                out = m(self.x)
        float(out.sum())
        return {"seconds": time.perf_counter() - t0}

    def matmul(self, a):
        t = self.torch
        n = a["n"]
        x, y = t.rand(n, n), t.rand(n, n)
        t.mm(x, y)
        times = []
        for _ in range(a["reps"]):
            t0 = time.perf_counter()
            t.mm(x, y)
            times.append(time.perf_counter() - t0)
        return {"times": times}


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
    def __init__(self, kind: str, env=None):
        self.kind = kind
        self.p = subprocess.Popen([sys.executable, __file__, "worker", kind], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=None, text=True,
                                  env={**os.environ, **(env or {})})

    def __call__(self, op: str, **kw):
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith(TAG):
                r = json.loads(line[len(TAG):])
                if not r.pop("ok"):
                    raise RuntimeError(f"{self.kind} worker: {op}: {r['error']}")
                return r
        raise RuntimeError(f"{self.kind} worker died during {op}")

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=60)


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
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "mem_gib": round(mem, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


def _med(xs):
    return statistics.median(xs)


# Steps per timed chunk and chunks per size: 224 px steps take seconds, so fewer of them.
PLAN = {32: (10, 5), 96: (3, 5), 224: (1, 5)}
PLAN_QUICK = {32: (4, 5), 96: (1, 5), 224: (1, 5)}


def throughput(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = [bn == "bn" for bn in args.variants.split(",")]
    plan = PLAN_QUICK if args.quick else PLAN
    res = {"machine": machine(), "command": " ".join(sys.argv), "runs": []}
    mxw, thw = Worker("mxnet"), Worker("torch")
    try:
        res["mxnet"], res["torch"] = mxw("info"), thw("info")
        print(f"# {res['machine']}\n# mxnet {res['mxnet']}\n# torch {res['torch']}", flush=True)
        # Practical peak: a 4096^2 fp32 matrix product in each framework (interleaved), best median.
        mm = {"mxnet": [], "torch": []}
        for _ in range(3):
            for name, w in (("mxnet", mxw), ("torch", thw)):
                mm[name] += w("matmul", n=4096, reps=2)["times"]
        flops = 2 * 4096 ** 3
        peak = {k: flops / _med(v) / 1e9 for k, v in mm.items()}
        res["matmul_gflops"] = peak
        res["peak_gflops"] = max(peak.values())
        print(f"matmul 4096^2 fp32: mxnet {peak['mxnet']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s "
              f"-> peak {res['peak_gflops']:.1f}", flush=True)
        for size in sizes:
            k, rounds = plan[size]
            for bn in variants:
                setup = dict(size=size, bn=bn, batch=args.batch, fc_units=args.fc_units)
                info = mxw("setup", **setup)
                thw("setup", **setup)
                b = args.batch
                # warm-up: one chunk each (hybridize/graph build, oneDNN primitive creation)
                mxw("train", steps=max(k, 2), data="synthetic")
                mxw("train", steps=max(k, 2), data="real")
                thw("train", steps=max(k, 2))
                t = {"mx_syn": [], "mx_real": [], "torch": []}
                for r in range(rounds):
                    order = [("mx_syn", lambda k=k: mxw("train", steps=k, data="synthetic")),
                             ("torch", lambda k=k: thw("train", steps=k)),
                             ("mx_real", lambda k=k: mxw("train", steps=k, data="real"))]
                    order = order[r % 3:] + order[:r % 3]
                    for name, fn in order:
                        t[name].append(fn()["seconds"] / k)
                ek = max(1, k)
                ev = {"mx": [], "torch": []}
                for _ in range(rounds):
                    ev["mx"].append(mxw("eval", steps=ek)["seconds"] / ek)
                    ev["torch"].append(thw("eval", steps=ek)["seconds"] / ek)
                ips = {n: b / _med(v) for n, v in t.items()}
                eips = {n: b / _med(v) for n, v in ev.items()}
                pipe_s = mxw("pipeline", steps=12)["seconds"]
                train_gflops = 3 * 2 * info["macs"] * ips["mx_syn"] / 1e9
                row = {"size": size, "bn": bn, "batch": b, "steps_per_chunk": k, "chunks": rounds,
                       "macs": info["macs"], "img_s": ips, "eval_img_s": eips,
                       "ratio_vs_torch": ips["mx_syn"] / ips["torch"],
                       "real_vs_synthetic": ips["mx_real"] / ips["mx_syn"],
                       "train_gflops": train_gflops, "share_of_peak": train_gflops / res["peak_gflops"],
                       "torch_share_of_peak": 3 * 2 * info["macs"] * ips["torch"] / 1e9 / res["peak_gflops"],
                       "pipeline_ms_per_batch": 1000 * pipe_s,
                       "pipeline_share_of_step": pipe_s / _med(t["mx_syn"]),
                       "raw_step_s": t, "raw_eval_s": ev}
                res["runs"].append(row)
                print(f"{size:>3}px {'BN   ' if bn else 'no-BN'} train img/s: mxnet {ips['mx_syn']:7.1f} "
                      f"(real data {ips['mx_real']:7.1f}, {row['real_vs_synthetic']:.0%})  torch {ips['torch']:7.1f}"
                      f"  ratio {row['ratio_vs_torch']:.2f}x  {train_gflops:6.1f} GFLOP/s = "
                      f"{row['share_of_peak']:.0%} of peak (torch {row['torch_share_of_peak']:.0%})  "
                      f"eval img/s: mxnet {eips['mx']:7.1f} torch {eips['torch']:7.1f}  "
                      f"data pipeline alone {1000 * pipe_s:.1f} ms/batch = {row['pipeline_share_of_step']:.1%} "
                      f"of a synthetic step", flush=True)
        if args.epoch and 32 in sizes:
            mxw("setup", size=32, bn=True, batch=args.batch, fc_units=args.fc_units)
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


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
        return
    # The package's own thread choice (vgg_gluon._env: one OpenMP thread per core idle now, or the
    # user's OMP_NUM_THREADS / VGG_GLUON_THREADS), made once here and inherited by BOTH workers.
    sys.path.insert(0, str(HERE.parent))
    import vgg_gluon  # noqa: F401
    print(f"# threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} for MXNet and PyTorch", flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["throughput", "syncs", "threads"])
    ap.add_argument("--sizes", default="32,96,224")
    ap.add_argument("--variants", default="bn,nobn", help="bn, nobn or both")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--fc-units", type=int, default=None, help="default 4096 x width = 1024")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per chunk (syncs)")
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true", help="fewer steps per chunk (a smoke test)")
    ap.add_argument("--no-epoch", dest="epoch", action="store_false", help="skip the whole real-data epochs")
    ap.add_argument("--real-epochs", type=int, default=3, help="whole real-data epochs at 32 px (median reported)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    res = {"throughput": throughput, "syncs": syncs, "threads": threads}[args.mode](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"# results: {path}")


if __name__ == "__main__":
    main()
