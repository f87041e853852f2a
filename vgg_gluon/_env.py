"""Process environment that must be set before `import mxnet` (imported by the package first).

MXNet reads its thread settings once, when the library loads. Its default OpenMP team is half
the cores; on a 2-core machine that halves training speed (830 vs 1,515 img/s measured here for
VGG-11 at 1/4 width, 32 px, batch 128). Values the user exported win: we only fill in defaults.
"""
import os


def cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores(seconds: float = 0.1) -> float:
    """Cores left idle by other processes right now (from two /proc/stat readings), or -1.

    Steal time counts as idle: it is the hypervisor running other guests on our virtual CPUs, not
    a process of this machine that our threads would fight. With 25% steal and nothing else
    running, counting it as busy gave 1.5 idle cores, hence one thread, and 30% slower training
    (1,040 vs 1,440-1,510 img/s measured for the Fashion-MNIST fast3 recipe, 2026-12-02)."""
    import time

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        steal = v[7] if len(v) > 7 else 0
        return v[3] + v[4] + steal, sum(v[:8])  # idle + iowait + steal, total
    try:
        i0, t0 = read()
        time.sleep(seconds)
        i1, t1 = read()
    except (OSError, ValueError, IndexError):
        return -1.0
    return -1.0 if t1 <= t0 else (i1 - i0) / (t1 - t0) * (os.cpu_count() or 1)


def default_threads() -> int:
    """One OpenMP thread per core that is free now (at least 1).

    Measured here (benchmarks/README.md): on a quiet 2-core machine 2 threads train ~1.8x faster
    than 1; with other work keeping the cores busy, 2 threads were 2.9x SLOWER than 1 (OpenMP's
    barriers wait on descheduled threads). So count the cores other processes leave idle.
    """
    cores = cpu_count()
    idle = idle_cores()
    if idle < 0:
        return cores
    if int(idle + 0.25) < cores:
        # A second, longer look before a whole run gets fewer threads: a 0.1 s sample that caught
        # a blip (a process still exiting, a shell starting) gave a 30-minute run 1 thread on an
        # otherwise idle 2-core machine, 180 s epochs instead of ~95 (2026-12-03). Only busy
        # machines pay the extra 0.4 s.
        idle = max(idle, idle_cores(0.4))
    return max(1, min(cores, int(idle + 0.25)))


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty when unknown, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _onednn_isa_cap() -> str:
    return (os.environ.get("DNNL_MAX_CPU_ISA") or os.environ.get("MKLDNN_MAX_CPU_ISA") or "ALL").upper()


def onednn_uses_avx512() -> bool:
    """True when oneDNN will pick AVX-512 kernels here: the CPU has avx512f and no
    DNNL_MAX_CPU_ISA / MKLDNN_MAX_CPU_ISA caps it below AVX-512 (Linux; False when unknown)."""
    cap = _onednn_isa_cap()
    if cap != "ALL" and "AVX512" not in cap:
        return False
    return "avx512f" in cpu_flags()


def onednn_has_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels here (`jit_bf16:avx512_core_bf16`): the CPU has
    avx512_bf16 (or AMX) and no ISA cap rules them out."""
    cap = _onednn_isa_cap()
    if cap != "ALL" and "BF16" not in cap and "AMX" not in cap:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


_AMX = {"granted": None}


def request_amx() -> bool:
    """Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), once per process.

    Since Linux 5.16 a process must ask before it runs an AMX instruction, or it dies of SIGILL;
    the oneDNN that MXNet 1.9.1 ships (v2.4) does not ask. True when the CPU has AMX and the
    kernel granted it (then oneDNN may be allowed its AMX kernels), False otherwise."""
    if _AMX["granted"] is None:
        _AMX["granted"] = False
        if {"amx_tile", "amx_bf16"} <= cpu_flags():
            try:
                import ctypes
                import platform
                if platform.machine() == "x86_64":
                    libc = ctypes.CDLL(None, use_errno=True)
                    # SYS_arch_prctl = 158 on x86_64; ARCH_REQ_XCOMP_PERM = 0x1023; XFEATURE_XTILEDATA = 18
                    _AMX["granted"] = libc.syscall(158, 0x1023, 18) == 0
            except (OSError, AttributeError):
                pass
    return _AMX["granted"]


def onednn_uses_amx() -> bool:
    """True when oneDNN will run its AMX bfloat16 kernels (`avx512_core_amx_bf16`): the kernel
    granted the tile state and the ISA cap allows AMX (configure() sets it when the user did not)."""
    return request_amx() and "AMX" in _onednn_isa_cap()


def _open_amx() -> None:
    """Let oneDNN dispatch its AMX kernels (DNNL_MAX_CPU_ISA) where Linux granted AMX and the user
    set no ISA cap of their own."""
    if request_amx() and "DNNL_MAX_CPU_ISA" not in os.environ and "MKLDNN_MAX_CPU_ISA" not in os.environ:
        os.environ["DNNL_MAX_CPU_ISA"] = "AVX512_CORE_AMX"


def configure() -> None:
    """Fill in MXNet/OpenMP defaults; the user's own environment variables are left untouched."""
    want = os.environ.get("VGG_GLUON_THREADS", "auto")
    if "OMP_NUM_THREADS" in os.environ and want == "auto":
        n = os.environ["OMP_NUM_THREADS"]
    else:
        n = str(default_threads()) if want == "auto" else want
    os.environ.setdefault("OMP_NUM_THREADS", n)
    os.environ.setdefault("MKL_NUM_THREADS", n)
    # One engine worker: the OpenMP team already uses the cores; 2 workers measured slower here.
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    # GPU: let cuDNN time its algorithms once per shape (static shapes make that a one-off).
    os.environ.setdefault("MXNET_CUDNN_AUTOTUNE_DEFAULT", "1")
    # No MKLDNN/subgraph chatter on stderr for every hybridized graph.
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    # AMX (Intel Xeon since Sapphire Rapids): oneDNN v2.4 keeps its AMX kernels behind
    # DNNL_MAX_CPU_ISA, and Linux kills a process that uses AMX without asking first. Both only
    # change bfloat16 and int8 kernels (--amp): float32 runs the same AVX-512 kernels either way.
    # Measured 2026-12-03 (Xeon with amx_bf16): a bfloat16 training step of the CIFAR-10 recipe
    # 2.1x faster than float32 with AMX, 0.7x without (benchmarks/README.md, "Ninth session").
    # Linux keeps the grant across fork but clears it on exec: a child process that runs bfloat16
    # or int8 operators must ask again (importing vgg_gluon does; PyTorch's oneDNN asks itself).
    _open_amx()
    # The ssl/numpy deprecation noise from mxnet/gluoncv is not the user's business.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


if __name__ == "__main__":
    # `python vgg_gluon/_env.py amx`: the Makefile's check for AMX, without MXNet, the venv or
    # configure()'s look at the idle cores. Prints "amx" where a run would get oneDNN's AMX kernels
    # (the same decision as configure() and onednn_uses_amx() make for a run).
    import sys
    if sys.argv[1:] == ["amx"]:
        _open_amx()
        print("amx" if onednn_uses_amx() else "")
    else:
        sys.exit("usage: python vgg_gluon/_env.py amx")
else:
    configure()
