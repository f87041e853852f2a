"""Per-step cost of MXNet's parameter server (dist_sync) against one process (local), on loopback.

    python benchmarks/dist_overhead.py                 # all cases, prints a Markdown table + JSON
    python benchmarks/dist_overhead.py --steps 30 --width 0.25 --batch-size 128
    python benchmarks/dist_overhead.py --steps 5 --width 0.5 --workers 1     # bytes vs parameter count

Cases (VGG-11 at the given width, 1x32x32 inputs, random data, SGD with momentum, global batch B):
  local          one process, one CPU context, no kvstore (what `vgg-gluon train` does on one device)
  dist_sync x1   1 worker + 1 server: the same computation plus a push and a pull of every gradient
  dist_sync x2   2 workers (B/2 each) + 1 server on the same 2 cores (no speed-up possible here)
  comm only      dist_sync x1, push+pull of all gradients with no computation

Bytes per step per worker are measured as the growth of the loopback interface's transmitted
bytes (/proc/net/dev, "lo") during the timed steps, divided by steps and workers; the parameter
count gives the expected payload (push + pull of every gradient in float32 = 8 bytes/parameter).
Only 127.0.0.1 is used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


def build(width: float, batch: int, ctx):
    import mxnet as mx

    from vgg_gluon import models
    net = models.build_vgg("vgg11", 10, width=width, batch_norm=False, dropout=0.0)
    models.initialize(net, [ctx], seed=0)
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.zeros((batch, 1, 32, 32), ctx=ctx))
    return net


def run_case(mode: str, steps: int, width: float, global_batch: int) -> dict:
    """Inside one process. A dist worker (DMLC_* set by the driver) times, alternately in blocks
    of 5 steps so that both see the same load on a shared machine: (a) its own local copy of the
    network trained with no kvstore, (b) the network trained through dist_sync, (c) push+pull of
    every gradient alone. Per-step times are medians."""
    import statistics

    import mxnet as mx
    from mxnet import autograd, gluon

    from vgg_gluon import distributed
    ctx = mx.cpu(0)
    dist = distributed.create("dist_sync")
    batch = global_batch // dist.num_workers
    opt = {"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4}
    net_l, net_d = build(width, batch, ctx), build(width, batch, ctx)
    n_params = sum(int(p.data().size) for p in net_d.collect_params().values())
    tr_l = gluon.Trainer(net_l.collect_params(), "sgd", opt, kvstore=None)
    tr_d = distributed.DistTrainer(net_d.collect_params(), "sgd", opt, kvstore=dist.kv, update_on_kvstore=False,
                                   num_workers=dist.num_workers)
    dist.init_trainer_keys(tr_d)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.uniform(shape=(batch, 1, 32, 32), ctx=ctx)
    y = mx.nd.array(list(range(10)) * (batch // 10 + 1), ctx=ctx)[:batch]

    def step(net, trainer):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch)

    def comm_only():
        for i, p in enumerate(tr_d._params):
            if p.grad_req != "null":
                dist.kv.pushpull(i, p.list_grad(), priority=-i)

    cases = {"local": lambda: step(net_l, tr_l), "dist": lambda: step(net_d, tr_d), "comm": comm_only}
    times = {k: [] for k in cases}
    tx = {k: 0 for k in cases}
    for fn in cases.values():   # warm-up (and the first dist steps allocate the servers' buffers)
        for _ in range(3):
            fn()
        mx.nd.waitall()
    for _ in range(max(1, steps // 5)):
        for name, fn in cases.items():
            dist.kv._barrier()   # workers start each block together
            tx0 = lo_tx_bytes()
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                mx.nd.waitall()   # one step at a time, as training does (it reads the loss)
                times[name].append(1000 * (time.perf_counter() - t0))
            tx[name] += lo_tx_bytes() - tx0
    out = {"mode": mode, "batch_per_worker": batch, "params": n_params, "rank": dist.rank,
           "num_workers": dist.num_workers, "steps_each": len(times["dist"])}
    for name in cases:
        out[f"{name}_ms"] = statistics.median(times[name])
        out[f"{name}_ms_p10_p90"] = [statistics.quantiles(times[name], n=10)[0],
                                     statistics.quantiles(times[name], n=10)[-1]]
        # loopback carries every worker's traffic: per worker = total / workers
        out[f"{name}_lo_bytes_per_step_per_worker"] = tx[name] / len(times[name]) / dist.num_workers
    distributed.note_outcome("finished")
    return out


def drive(args) -> list:
    """Start each case as real processes (the launcher's supervision) and collect their JSON."""
    import tempfile

    from vgg_gluon import launch
    results = []
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--steps", str(args.steps), "--width", str(args.width), "--batch-size", str(args.batch_size)]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            outs = [Path(tmp) / f"w{workers}-{i}.json" for i in range(workers)]
            nodes = launch.plan(workers, 1, ["train"], port=launch.free_port(), launch_id="bench",
                                threads=args.threads or max(1, cores // workers))
            wi = 0
            for node in nodes:
                if node.role == "worker":
                    node.argv = [*me, "--role", "worker", "--out", str(outs[wi]), *common]
                    wi += 1
            code = launch.Launcher(nodes, grace=5, echo=lambda m: None).run()
            if code:
                raise SystemExit(f"dist_sync x{workers} failed with exit code {code}")
            rows = [json.loads(o.read_text()) for o in outs]
            results.append(next(r for r in rows if r["rank"] == 0))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch")
    ap.add_argument("--workers", type=lambda v: [int(w) for w in v.split(",")], default=[1, 2],
                    help="worker counts to run, e.g. 1,2 (default)")
    ap.add_argument("--threads", type=int, help="OpenMP threads per worker (default: cores / workers)")
    ap.add_argument("--role", choices=("driver", "worker"), default="driver")
    ap.add_argument("--out")
    args = ap.parse_args()
    import vgg_gluon  # noqa: F401  (thread settings before mxnet)
    if args.role != "driver":
        res = run_case("dist_sync", args.steps, args.width, args.batch_size)
        Path(args.out).write_text(json.dumps(res))
        return
    res = drive(args)
    p = res[0]["params"]
    print(f"VGG-11 x{args.width:g} (no BN), 1x32x32, global batch {args.batch_size}, "
          f"{res[0]['steps_each']} timed steps per case, {p:,} parameters ({4 * p / 2**20:.1f} MiB float32)\n")
    print("| processes | batch / worker | local step ms | dist_sync step ms | overhead ms (%) | "
          "push+pull only ms | loopback bytes / step / worker |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        over = r["dist_ms"] - r["local_ms"]
        lo = r["dist_lo_bytes_per_step_per_worker"]
        print(f"| {r['num_workers']} worker(s) + 1 server | {r['batch_per_worker']} | {r['local_ms']:.1f} | "
              f"{r['dist_ms']:.1f} | {over:+.1f} ({100 * over / r['local_ms']:+.0f}%) | {r['comm_ms']:.1f} | "
              f"{lo / 2**20:.2f} MiB = {lo / p:.2f} B/param |")
    print("\n" + json.dumps(res))


if __name__ == "__main__":
    main()
