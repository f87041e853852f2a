"""airbench94 itself (PyTorch, the `airbench` package from PyPI) on this project's CIFAR-10 copy.

Why: the best CIFAR-10 recipe here (fast3 x1.0, airbench94's techniques in Gluon) stays about 3-4
points below airbench94's published 94.0%. This runs the reference implementation, unchanged, on
the same data (the JPEG copy, as `vgg_gluon.data.load_dataset` reads it) and the same 2 cores, so
the gap splits into what the data costs and what the Gluon pipeline costs.

airbench 0.1.8 is written for CUDA and half precision. The only changes made here, all outside
its code (monkeypatches before it runs):
- `.cuda()` / `.half()` on modules are no-ops, so the net is float32 on the CPU;
- the loader keeps its images in float32 on the CPU (it converts them to half on the GPU);
- CUDA events are replaced by wall-clock timestamps (`time.perf_counter`);
- torchvision is replaced by a stub holding only `transforms.Normalize` (the PyPI torchvision
  wheel does not load beside the CPU build of torch; airbench uses nothing else of it when the
  data files already exist).

Usage (benchmarks/.venv, with `airbench==0.1.8` installed by `make -C benchmarks venv`):
    benchmarks/.venv/bin/python benchmarks/airbench_ref.py --seed 0 [--width 0.5] [--epochs 9.9]
Prints airbench's own per-epoch table (val_acc = test accuracy without TTA, tta_val_acc = its
flip-translate TTA, total_time_seconds = training time without evaluation) and one JSON line.
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from vgg_gluon._env import cpu_count  # affinity-aware, as the product counts cores

ROOT = Path(__file__).resolve().parents[1]


def _stub_torchvision() -> None:
    class Normalize:
        def __init__(self, mean, std):
            self.mean = torch.as_tensor(mean).view(-1, 1, 1)
            self.std = torch.as_tensor(std).view(-1, 1, 1)

        def __call__(self, x):
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Normalize = Normalize
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = tv.transforms


class _WallEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)


def _patch_for_cpu():
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self: self
    torch.cuda.Event = _WallEvent
    torch.cuda.synchronize = lambda *a, **k: None


def _write_data(folder: Path, data_dir) -> str:
    from vgg_gluon.data import load_dataset  # the project's reader (installed in benchmarks/.venv)
    ds = load_dataset("cifar10", data_dir, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in ((ds.train, "train.pt"), (ds.test, "test.pt")):
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(split.images)),
                    "labels": torch.from_numpy(split.labels.astype(np.int64)),
                    "classes": list(ds.classes)}, folder / name)
    return ds.source


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=float, default=1.0,
                    help="multiplies airbench94's widths 64/256/256 (0.5: the CIFAR-10 default's)")
    ap.add_argument("--epochs", type=float, default=9.9, help="airbench94's own: 9.9")
    ap.add_argument("--threads", type=int, default=cpu_count(), help="default: the cores this process may use")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    _stub_torchvision()
    _patch_for_cpu()
    import airbench
    import airbench.utils as au
    from airbench.lib_airbench94 import hyp, make_net94

    from vgg_gluon.errors import UserError

    class CpuLoader(au.CifarLoader):
        def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None,
                     shuffle=None, altflip=False, gpu=0):
            super().__init__(path, train=train, batch_size=batch_size, aug=aug, drop_last=drop_last,
                             shuffle=shuffle, altflip=altflip, gpu="cpu")
            self.images = self.images.float()

    au.CifarLoader = CpuLoader  # train() builds its test loader through this name

    work = Path(tempfile.mkdtemp(prefix="airbench_ref_"))
    try:
        source = _write_data(work / "cifar10", args.data_dir)
        os.chdir(work)
        widths = {k: max(1, int(round(v * args.width))) for k, v in hyp["net"]["widths"].items()}
        print(f"airbench {importlib.metadata.version('airbench')} | torch {torch.__version__} | "
              f"threads {torch.get_num_threads()} | data {source} | widths {widths} | "
              f"epochs {args.epochs} | seed {args.seed}", flush=True)

        torch.manual_seed(args.seed)
        loader = CpuLoader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"],
                           aug=hyp["aug"], altflip=True)
        t0 = time.perf_counter()
        model = airbench.train94(loader, epochs=args.epochs, make_net=lambda: make_net94(widths=widths),
                                 run=args.seed, verbose=True)
        wall = time.perf_counter() - t0
        test = CpuLoader("cifar10", train=False, batch_size=2000)
        acc = au.evaluate(model, test, tta_level=0)
        acc_tta = au.evaluate(model, test, tta_level=2)
        print(json.dumps({"seed": args.seed, "width": args.width, "epochs": args.epochs,
                          "test_acc": round(100 * acc, 2), "test_acc_tta": round(100 * acc_tta, 2),
                          "wall_s": round(wall, 1), "data": source}), flush=True)
    except UserError as e:  # no CIFAR-10 copy: `make data` (or `make bench BENCH=airbench`) prepares it
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)  # the data copies: ~180 MB
    return 0


if __name__ == "__main__":
    sys.exit(main())
