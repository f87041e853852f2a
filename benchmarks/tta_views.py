"""Which test-time augmentation, chosen on a VALIDATION split (issue 10: no tuning on the test set).

For runs trained with `--val-split`, compute the logits of every validation image under each view
once (the image shifted by (dy, dx) px with reflected borders, and its mirror), then print the
validation accuracy of several ways of averaging them: no TTA, flip, airbench94's level 2 (what
`--tta flip-translate` does), and wider sets of shifts. The test split is never read.

    .venv/bin/python benchmarks/tta_views.py /work/runs/run-a /work/runs/run-b [--which last]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import mxnet as mx
import numpy as np

from vgg_gluon import checkpoint as ck
from vgg_gluon import engine
from vgg_gluon.config import RunConfig
from vgg_gluon.fasttrain import translate
from vgg_gluon.session import input_dtype

Shift = Tuple[int, int]
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
DIAG = [(-1, -1), (-1, 1), (1, -1), (1, 1)]
AXIS = [(-1, 0), (1, 0), (0, -1), (0, 1)]
FAR = [(-2, -2), (-2, 2), (2, -2), (2, 2)]
SHIFTS: List[Shift] = [(0, 0)] + NEIGHBOURS + FAR
FLIP_TRANSLATE = "flip-translate (airbench L2: 1/2 centre + 1/4 (-1,-1) + 1/4 (1,1))"


def view_logits(run: Path, which: str) -> Tuple[Dict[Tuple[Shift, bool], np.ndarray], np.ndarray]:
    c = ck.select_checkpoint(run, which)
    cfg = RunConfig.from_dict(c.meta()["config"], f"{c.path}/meta.json")
    if not cfg.val_split:
        sys.exit(f"{run}: trained without --val-split; this script reads validation images only")
    s = engine.build_session(cfg, train=False, params_source=c)
    dtype = input_dtype(s.net)
    out: Dict[Tuple[Shift, bool], List[np.ndarray]] = {(d, f): [] for d in SHIFTS for f in (False, True)}
    labels = []
    for data, ys in s.val_loader.epoch(0):
        for x, y in zip(data, ys):
            labels.append(y.asnumpy())
            for d in SHIFTS:
                v = translate(x, *d)
                for f in (False, True):
                    z = s.net((mx.nd.flip(v, axis=3) if f else v).astype(dtype, copy=False))
                    out[(d, f)].append(z.astype("float32").asnumpy())
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(labels).astype(np.int64)


def combos(z: Dict[Tuple[Shift, bool], np.ndarray]) -> Dict[str, np.ndarray]:
    def f(d):  # flip-mean at shift d
        return 0.5 * z[(d, False)] + 0.5 * z[(d, True)]

    def ring(ds):
        return sum(f(d) for d in ds) / len(ds)
    c0 = f((0, 0))
    return {
        "none": z[((0, 0), False)],
        "flip": c0,
        FLIP_TRANSLATE: 0.5 * c0 + 0.5 * ring([(-1, -1), (1, 1)]),
        "1/2 centre + 1/2 mean of 4 diagonals": 0.5 * c0 + 0.5 * ring(DIAG),
        "1/2 centre + 1/2 mean of 4 axis shifts": 0.5 * c0 + 0.5 * ring(AXIS),
        "1/2 centre + 1/2 mean of 8 neighbours": 0.5 * c0 + 0.5 * ring(NEIGHBOURS),
        "mean of centre and 8 neighbours": (c0 + 8 * ring(NEIGHBOURS)) / 9,
        "1/2 centre + 1/4 of 8 neighbours + 1/4 of 4 at 2 px": 0.5 * c0 + 0.25 * ring(NEIGHBOURS) + 0.25 * ring(FAR),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--which", default="last", choices=["best", "last"])
    a = p.parse_args()
    print(f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}; validation split only")
    table: Dict[str, List[float]] = {}
    for run in a.runs:
        z, y = view_logits(run, a.which)
        print(f"\n{run} ({len(y)} validation images, {a.which} checkpoint)")
        for name, logits in combos(z).items():
            acc = float((logits.argmax(axis=1) == y).mean())
            table.setdefault(name, []).append(acc)
            print(f"  {100 * acc:6.2f}%  {name}")
    if len(a.runs) > 1:
        base = table[FLIP_TRANSLATE]
        print(f"\nmean over {len(a.runs)} runs, and the mean difference to flip-translate (points):")
        for name, accs in table.items():
            diff = 100 * float(np.mean(np.array(accs) - np.array(base)))
            print(f"  {100 * float(np.mean(accs)):6.2f}%  {diff:+.2f}  {name}")


if __name__ == "__main__":
    main()
