"""Devices, MXNet import and seeding.

Thread settings happen in `vgg_gluon._env`, which the package imports before anything else.
"""
from __future__ import annotations

import logging
import random
import re
from typing import List, Optional

import numpy as np

from vgg_gluon.errors import UserError

log = logging.getLogger(__name__)


class RuntimeSetupError(UserError):
    """A one-line, user-facing problem with MXNet or the requested devices."""


# Known MXNet/CUDA failure texts -> what the user should do. Order matters: first match wins.
_GPU_ERRORS = (
    (r"libcuda\.so|libcudart|libcublas|libcudnn|libnvrtc|cannot open shared object file",
     "the NVIDIA driver or CUDA 11.2 libraries are missing: install the NVIDIA driver and the "
     "CUDA 11.2 runtime (cuBLAS, cuDNN 8), or use the CPU build: pip install -c constraints.txt -e .[cpu]"),
    (r"no kernel image is available|invalid device function|CUDA_ERROR_NO_BINARY_FOR_GPU",
     "this GPU's architecture has no kernels in this MXNet build: mxnet-cu112 supports NVIDIA "
     "sm_50..sm_86 (Maxwell to Ampere/Ada), not Hopper (H100/H200); train on the CPU with --ctx cpu"),
    (r"out of memory|cudaMalloc|CUDA_ERROR_OUT_OF_MEMORY|Memory allocation failed|"
     r"Failed to allocate CPU Memory|std::bad_alloc",
     "the device ran out of memory: use a smaller --batch-size, a smaller --image-size or --width"),
    (r"CUDA driver version is insufficient|cudaErrorInsufficientDriver",
     "the NVIDIA driver is older than CUDA 11.2 needs: update the driver"),
    (r"Compile with USE_CUDA=1|GPU is not enabled|not compiled with CUDA|not implemented for GPU|"
     r"GPU support is disabled",
     "this MXNet build has no CUDA: install mxnet-cu112 (pip install -c constraints.txt -e .[gpu]) "
     "or use --ctx cpu"),
)


def explain_mxnet_error(exc: BaseException) -> Optional[str]:
    """Map an MXNet/CUDA exception to a one-line fix, or None when it is not a known device problem."""
    if isinstance(exc, MemoryError):
        return _GPU_ERRORS[2][1]
    text = str(exc)
    for pattern, advice in _GPU_ERRORS:
        if re.search(pattern, text, re.IGNORECASE):
            return advice
    return None


def import_mxnet():
    """Import mxnet, turning a missing or broken installation into a RuntimeSetupError."""
    try:
        import mxnet as mx
    except ImportError as exc:  # module absent, or present but its shared libraries are not
        advice = explain_mxnet_error(exc)
        if advice:
            raise RuntimeSetupError(f"cannot load MXNet: {advice}") from exc
        raise RuntimeSetupError(
            "MXNet is not installed: run `make setup`, or pip install -c constraints.txt "
            "-e .[cpu] (CPU) / -e .[gpu] (NVIDIA GPU)") from exc
    except OSError as exc:
        advice = explain_mxnet_error(exc) or str(exc)
        raise RuntimeSetupError(f"cannot load MXNet: {advice}") from exc
    return mx


def parse_ctx(spec: str) -> List[str]:
    """Validate a --ctx string and return canonical device names, without touching MXNet.

    Accepted: auto, cpu, gpu, cpu:N[,M...], gpu:N[,M...]. Returns e.g. ["cpu:0", "cpu:1"];
    "auto" stays ["auto"] until `resolve_ctx` knows what hardware there is.
    """
    s = (spec or "auto").strip().lower().replace(" ", "")
    if s in ("auto", "cpu", "gpu"):
        return [s if s == "auto" else f"{s}:0"]
    m = re.fullmatch(r"(cpu|gpu):(\d+(?:,\d+)*)", s)
    if not m:
        raise RuntimeSetupError(
            f"unknown context '{spec}': use auto, cpu, gpu, gpu:0,1 or cpu:0,1")
    kind, ids = m.group(1), [int(i) for i in m.group(2).split(",")]
    if len(set(ids)) != len(ids):
        raise RuntimeSetupError(f"context '{spec}' names a device twice")
    return [f"{kind}:{i}" for i in ids]


def num_gpus() -> int:
    mx = import_mxnet()
    if not mx.runtime.Features().is_enabled("CUDA"):
        return 0
    try:
        return mx.context.num_gpus()
    except Exception:  # driver present but unusable: treat as no GPU for "auto"
        return 0


def resolve_ctx(spec: str) -> list:
    """Turn a --ctx string into a list of mx.Context, checking that the GPUs exist."""
    mx = import_mxnet()
    names = parse_ctx(spec)
    if names == ["auto"]:
        n = num_gpus()
        return [mx.gpu(i) for i in range(n)] if n else [mx.cpu(0)]
    kind = names[0].split(":")[0]
    ids = [int(n.split(":")[1]) for n in names]
    if kind == "cpu":
        return [mx.cpu(i) for i in ids]
    if not mx.runtime.Features().is_enabled("CUDA"):
        raise RuntimeSetupError(
            f"--ctx {spec} asks for a GPU but this MXNet build has no CUDA: install mxnet-cu112 "
            "(make setup GPU=1) or use --ctx cpu")
    try:
        visible = mx.context.num_gpus()
    except Exception as exc:
        raise RuntimeSetupError(
            f"--ctx {spec}: cannot query GPUs: {explain_mxnet_error(exc) or exc}") from exc
    missing = [i for i in ids if i >= visible]
    if missing:
        raise RuntimeSetupError(
            f"--ctx {spec}: GPU {missing[0]} does not exist ({visible} visible; "
            "check CUDA_VISIBLE_DEVICES and nvidia-smi)")
    return [mx.gpu(i) for i in ids]


def ctx_string(ctx_list) -> str:
    """Inverse of resolve_ctx, for the run's config: [cpu(0), cpu(1)] -> 'cpu:0,1'."""
    kind = ctx_list[0].device_type
    return f"{kind}:" + ",".join(str(c.device_id) for c in ctx_list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and MXNet (on every device) so a run is repeatable."""
    mx = import_mxnet()
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    mx.random.seed(seed)
