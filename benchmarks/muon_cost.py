"""Time one optimizer update of the CIFAR-10 default's network (fast3 x0.5, GELU, BN): NAG against
`--optimizer muon`, on fixed random gradients, no forward or backward pass; two rounds each.

    .venv/bin/python benchmarks/muon_cost.py      (results: benchmarks/README.md, "Sixth session")
"""
import time

import vgg_gluon.muon  # noqa: F401 - registers "muon"
from vgg_gluon import models as M

mx = M.mx


def main():
    flags = next((line.split()[2:] for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    print("cpu flags (avx*/fma):", " ".join(f for f in flags if f.startswith(("avx", "fma"))))
    opts = M.LayerOptions(activation="gelu", bn_scale=False, bn_momentum=0.6, dirac_init=True)
    net = M.build_vgg("fast3", 10, width=0.5, batch_norm=True, opts=opts, in_channels=3)
    net.initialize(ctx=mx.cpu())
    net(mx.nd.zeros((2, 3, 32, 32)))
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    for p in params:
        p.grad()[:] = mx.nd.random.normal(shape=p.shape)
    for opt, extra in (("nag", {}), ("muon", {"muon_scale": 0.1})) * 2:
        trainer = mx.gluon.Trainer(net.collect_params(), opt, {"learning_rate": 0.01, "momentum": 0.85, **extra})

        def step(trainer=trainer):
            for p in params:
                p._data[0]._fresh_grad = True  # noqa: SLF001 - as if a backward pass had written it
            trainer.step(512)
        for _ in range(3):
            step()
        mx.nd.waitall()
        t = time.time()
        for _ in range(20):
            step()
        mx.nd.waitall()
        print(f"{opt}: {(time.time() - t) / 20 * 1000:.1f} ms per update")


if __name__ == "__main__":
    main()
