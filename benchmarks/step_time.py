"""Time one hybridized training step of a spec row on synthetic data (issue 10's sizing tool).

    benchmarks/step_time.py ARCH WIDTH ACTIVATION BATCH CHANNELS [SIDE] [--no-relayout] [--no-pad] [--amp]
    e.g. .venv/bin/python benchmarks/step_time.py fast3 0.5 relu 256 3

--no-relayout: without models._RelayoutBatchNorm (the BatchNorm after the whitened stem's
24-channel conv then runs oneDNN's reference backward kernel on AVX-512 CPUs).
--amp: MXNet AMP bfloat16 (amp.init before the network is built), as `vgg-gluon train --amp` on a
CPU; AMX where the CPU has it (vgg_gluon._env; DNNL_MAX_CPU_ISA=AVX512_CORE_BF16 turns AMX off).
--no-pad: the whitened stem runs with its own filter count (24 for RGB, 8 for grey) instead of
the next multiple of 16 (cpu_layers.ZeroPaddedConv2D), i.e. on oneDNN's AVX2 kernels.

Fast-training layer options (BN without scale, momentum 0.4, identity init), Nesterov; 3 warm-up
steps, then the mean of 10. Prints the CPU's vector flags, ms/step, img/s and the load average
(the machine is shared).
"""
import sys
import time

from vgg_gluon import _env
from vgg_gluon import models as M  # thread settings before mxnet (vgg_gluon.runtime)

mx = M.mx
autograd, gluon = mx.autograd, mx.gluon


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    if len([a for a in argv if not a.startswith("--")]) < 5:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    use_amp = "--amp" in argv
    if use_amp:
        argv = [a for a in argv if a != "--amp"]
        from mxnet.contrib import amp
        amp.init(target_dtype="bfloat16")
    if "--no-relayout" in argv:
        argv = [a for a in argv if a != "--no-relayout"]
        M.needs_relayout = lambda in_channels: False
    if "--no-pad" in argv:
        argv = [a for a in argv if a != "--no-pad"]
        M.stem_padding = lambda channels: 0
    arch, width, act, bs, ch = argv[0], float(argv[1]), argv[2], int(argv[3]), int(argv[4])
    side = int(argv[5]) if len(argv) > 5 else 32
    opts = M.LayerOptions(activation=act, bn_scale=False, bn_momentum=0.4, dirac_init=arch in M.LAYOUTS)
    net = M.build_vgg(arch, 10, width=width, batch_norm=True, opts=opts, in_channels=ch)
    net.initialize(ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    x = mx.nd.random.normal(shape=(bs, ch, side, side))
    y = mx.nd.random.randint(0, 10, shape=(bs,)).astype("float32")
    net(x)
    trainer = gluon.Trainer(net.collect_params(), "nag", {"learning_rate": 0.01, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step():
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(bs)
    for _ in range(3):
        step()
    mx.nd.waitall()
    t, n = time.time(), 10
    for _ in range(n):
        step()
    mx.nd.waitall()
    dt = (time.time() - t) / n
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    flags = next((line.split()[2:] for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    print("cpu flags (avx*/fma):", " ".join(f for f in flags if f.startswith(("avx", "fma"))),
          "| oneDNN AVX-512:", _env.onednn_uses_avx512(), "| AMX:", _env.onednn_uses_amx(),
          "| AMP bfloat16:", use_amp)
    print(f"{arch} x{width} {act} batch {bs} {ch} ch {side} px: {dt * 1000:.0f} ms/step {bs / dt:.0f} img/s "
          f"(load {load})")


if __name__ == "__main__":
    main(sys.argv[1:])
