"""Looking at a network and using it: layer summary, predictions on image files, export for serving,
and the visual report of a run.

The CLI commands `summary`, `predict`, `export` and `report` are thin wrappers around this module.
MXNet is imported lazily (the summary of a spec needs only the model builder).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from vgg_gluon.config import RunConfig
from vgg_gluon.errors import UserError, mxnet_error_reason
from vgg_gluon.imagefile import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

EXPORT_PREFIX = "model"
EXPORT_FORMAT = "vgg-gluon-export/1"


class InspectError(UserError):
    """A one-line, user-facing problem (shown as `Error: ...`)."""


# ------------------------------------------------------------------------------------------------
# what a run was trained with
def source_size(dataset: str) -> int:
    """Side of the images as stored in the data set, before padding/resizing: 28 for Fashion-MNIST
    (zero-padded to 32 for the network), 32 for CIFAR-10 (image folders are decoded at 32x32)."""
    return 28 if dataset == "fashion-mnist" else 32


@dataclass
class RunModel:
    """A run's network loaded from one checkpoint, with what is needed to feed it."""
    run_dir: Path
    checkpoint: Any               # checkpoint.Checkpoint
    cfg: RunConfig
    meta: Dict[str, Any]
    prep: Dict[str, Any]          # meta["preprocessing"]
    net: Any = None
    ctx: Any = None

    @property
    def classes(self) -> List[str]:
        return list(self.prep["classes"])

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.prep["input_shape"])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return self.input_shape[0]


def run_config(run_dir: Path) -> RunConfig:
    """The settings of a run folder: from its newest checkpoint, else its config.yaml."""
    from vgg_gluon import checkpoint as ck
    from vgg_gluon.config import load_yaml
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"{run_dir}: no such run folder")
    try:
        c = ck.select_checkpoint(run_dir, "last")
        return RunConfig.from_dict(c.meta()["config"], f"{c.path}/meta.json")
    except ck.CheckpointError:
        if (run_dir / "config.yaml").is_file():
            return RunConfig.from_dict(load_yaml(run_dir / "config.yaml"), str(run_dir / "config.yaml"))
        raise


def run_num_classes(run_dir: Path) -> Optional[int]:
    """Number of classes a run was trained on (an image folder may have any number), if recorded."""
    from vgg_gluon import checkpoint as ck
    try:
        classes = ck.select_checkpoint(Path(run_dir), "last").meta().get("preprocessing", {}).get("classes")
    except ck.CheckpointError:
        return None
    return len(classes) if classes else None


def load_run_model(run_dir: Path, which: str = "best", ctx=None) -> RunModel:
    """Build the run's network and load the weights of its `which` (best|last) checkpoint."""
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine
    mx = engine.mx
    run_dir = Path(run_dir)
    c = ck.select_checkpoint(run_dir, which)
    meta = c.meta()
    cfg = RunConfig.from_dict(meta["config"], f"{c.path}/meta.json")
    prep = meta.get("preprocessing")
    if not prep or "classes" not in prep:
        raise InspectError(f"{c.path}/meta.json: no preprocessing recorded (checkpoint too old)")
    if isinstance(ctx, str):   # --ctx of predict/export/report: one device is enough, the first
        from vgg_gluon.runtime import resolve_ctx
        ctx = resolve_ctx(ctx)[0]
    ctx = ctx or mx.cpu()
    net = engine.build_network(cfg, len(prep["classes"]), [ctx])  # the run's layer options
    if getattr(cfg, "dtype", "float32") != "float32":
        # A float16 run: its weights are cast to float32 on loading (predict/export/report run
        # anywhere, and an export serves float32 inputs).
        try:
            net.load_parameters(str(c.file(ck.PARAMS)), ctx=[ctx], cast_dtype=True, dtype_source="current")
        except Exception as exc:  # MXNetError, AssertionError
            raise ck.CheckpointError(f"{c.file(ck.PARAMS)}: cannot load weights "
                                     f"({mxnet_error_reason(exc)[:200]})") from None
    else:
        engine.load_checkpoint_params(net, c.file(ck.PARAMS), [ctx])
    net.hybridize()
    return RunModel(run_dir, c, cfg, meta, prep, net, ctx)


# ------------------------------------------------------------------------------------------------
# summary
def summary(arch: str, *, width: float, batch_norm: bool, fc_units: Optional[int], num_classes: int,
            input_shape: Tuple[int, int, int], layers: bool = False) -> Dict[str, Any]:
    """Per-block (or per-layer) rows for a spec and input size, as plain data."""
    from vgg_gluon import models, netsummary
    try:
        net = models.build_vgg(arch, num_classes, width=width, batch_norm=batch_norm, fc_units=fc_units,
                               in_channels=int(input_shape[0]))
        rows = (netsummary.layer_summary if layers else netsummary.block_summary)(net, tuple(input_shape))
    except ValueError as exc:
        raise InspectError(str(exc)) from None
    return {"arch": arch, "width": width, "batch_norm": batch_norm, "fc_units": net.fc_units,
            "num_classes": num_classes, "input_shape": [1, *input_shape], "description": net.describe(),
            "rows": [dict(asdict(r), output_shape=list(r.output_shape)) for r in rows],
            "total_params": sum(r.params for r in rows), "total_macs": sum(r.macs for r in rows)}


def human(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:g}"


def format_summary_text(s: Dict[str, Any]) -> str:
    from vgg_gluon.netsummary import LayerRow, format_summary
    rows = [LayerRow(r["name"], r["kind"], tuple(r["output_shape"]), r["params"], r["macs"]) for r in s["rows"]]
    head = f"{s['description']}, {s['num_classes']} classes, input {tuple(s['input_shape'])}"
    foot = (f"{human(s['total_params'])} parameters ({s['total_params'] * 4 / 2 ** 20:.1f} MiB float32), "
            f"{human(s['total_macs'])} multiply-adds per image (~{human(2 * s['total_macs'])}FLOPs)")
    input_line = f"{'input':<26} {'':<8} {str(tuple(s['input_shape']))}"
    table = format_summary(rows).splitlines()
    return "\n".join([head, "", table[0], input_line, *table[1:], "", foot])


# ------------------------------------------------------------------------------------------------
# images -> the run's input
def expand_inputs(paths: Iterable[str]) -> List[Path]:
    """Files as given; folders expanded to their image files (recursively, sorted)."""
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                log.warning("%s: no image files in this folder", p)
            out.extend(found)
        else:
            out.append(p)
    return out


def decode_image(path: Path, channels: int, size: int) -> np.ndarray:
    """Any PNG/JPEG (any size or mode) -> uint8 (size, size, channels) as the data set stores images:
    grayscale (L) for 1 channel, RGB for 3, resized with bilinear filtering like image folders are.
    Raises InspectError with a one-line reason."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    from vgg_gluon.imagefile import read_image
    # gluoncv (imported for the LR schedulers) sets ImageFile.LOAD_TRUNCATED_IMAGES = True for the
    # whole process, which would turn a truncated file into a silently half-gray picture.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        arr = read_image(path, channels, size)
    except FileNotFoundError:
        raise InspectError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InspectError(f"{path}: is a folder") from None
    except UnidentifiedImageError:
        raise InspectError(f"{path}: not an image (PNG/JPEG expected)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InspectError(f"{path}: unreadable image ({why})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return arr


def to_input(images: np.ndarray, prep: Dict[str, Any], ctx):
    """uint8 (N, H, W, C) -> the normalized batch the network saw in training (data.transform_batch)."""
    from vgg_gluon import data as data_mod
    from vgg_gluon.engine import mx
    x = mx.nd.array(images, ctx=ctx, dtype=np.uint8)
    return data_mod.transform_batch(x, mean=prep["mean"], std=prep["std"], pad_to=prep.get("pad_to"),
                                    image_size=prep.get("image_size"))


def probabilities(net, images: np.ndarray, prep: Dict[str, Any], ctx, batch_size: int = 128) -> np.ndarray:
    """Softmax outputs (N, classes) for uint8 images (N, H, W, C)."""
    from vgg_gluon import engine
    mx = engine.mx
    # a float16 network (a session of a --dtype float16 run) takes float16 inputs
    in_dtype = engine.input_dtype(net) if hasattr(engine, "input_dtype") else "float32"
    outs = []
    for i in range(0, len(images), batch_size):
        logits = net(to_input(images[i:i + batch_size], prep, ctx).astype(in_dtype, copy=False))
        outs.append(mx.nd.softmax(logits.astype("float32", copy=False), axis=1).asnumpy())
    return np.concatenate(outs) if outs else np.zeros((0, len(prep["classes"])), np.float32)


@dataclass
class Prediction:
    file: str
    top: List[Dict[str, Any]] = field(default_factory=list)   # [{"class", "index", "probability"}]


def predict_files(model: RunModel, paths: Sequence[Path], top_k: int = 3
                  ) -> Tuple[List[Prediction], List[str]]:
    """Top-k predictions for every readable image; one error line per file that is not."""
    size = source_size(model.prep["dataset"])
    ok_paths, images, errors = [], [], []
    for p in paths:
        try:
            images.append(decode_image(p, model.channels, size))
            ok_paths.append(p)
        except InspectError as exc:
            errors.append(str(exc))
    preds: List[Prediction] = []
    if images:
        probs = probabilities(model.net, np.stack(images), model.prep, model.ctx)
        k = max(1, min(top_k, probs.shape[1]))
        for p, row in zip(ok_paths, probs):
            order = np.argsort(-row, kind="stable")[:k]
            preds.append(Prediction(str(p), [{"class": model.classes[i], "index": int(i),
                                              "probability": float(row[i])} for i in order]))
    return preds, errors


# ------------------------------------------------------------------------------------------------
# export
def export(model: RunModel, out_dir: Path) -> Dict[str, Path]:
    """HybridBlock.export (symbol JSON + params) plus preprocessing.json: servable without vgg-gluon."""
    from vgg_gluon.engine import mx
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, s = model.input_shape[0], model.input_shape[1]  # (C, S, S)
    model.net.hybridize()
    model.net(mx.nd.zeros((1,) + model.input_shape, ctx=model.ctx))
    model.net.export(str(out_dir / EXPORT_PREFIX), epoch=0)
    prep = model.prep
    src = source_size(prep["dataset"])
    image_size = prep.get("image_size")
    steps = [f"decode the image and convert it to {'grayscale (PIL mode L)' if c == 1 else 'RGB'}",
             f"resize to {src}x{src} (bilinear) unless it already is"]
    if image_size and image_size != src:
        steps.append(f"resize to {image_size}x{image_size} (bilinear, MXNet BilinearResize2D)")
    elif prep.get("pad_to") and prep["pad_to"] > src:
        steps.append(f"zero-pad to {prep['pad_to']}x{prep['pad_to']} (centered, "
                     f"{(prep['pad_to'] - src) // 2} px each side, in pixel units, before normalizing)")
    steps += ["x = (pixel - mean) / std per channel, pixels in 0..255",
              f"layout NCHW float32, shape (N, {c}, {s}, {s}); input name 'data'",
              "softmax of the output gives class probabilities in the order of 'classes'"]
    info = {
        "format": EXPORT_FORMAT, "symbol": f"{EXPORT_PREFIX}-symbol.json", "params": f"{EXPORT_PREFIX}-0000.params",
        "input_name": "data", "input_shape": [1, *model.input_shape], "channels": c,
        "color_mode": "L" if c == 1 else "RGB", "size": s, "source_size": src,
        "pad_to": None if image_size else prep.get("pad_to"), "image_size": image_size,
        "mean": list(prep["mean"]), "std": list(prep["std"]), "pixel_range": [0, 255],
        "classes": model.classes, "dataset": prep["dataset"], "steps": steps,
        "arch": model.cfg.arch, "width": model.cfg.width, "batch_norm": model.cfg.batch_norm,
        "checkpoint": str(model.checkpoint.path), "epoch": model.checkpoint.epoch,
        "test_acc": model.meta.get("metrics", {}).get("test_acc"),
    }
    (out_dir / "preprocessing.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out_dir / "serve_example.py").write_text(SERVE_EXAMPLE, encoding="utf-8")
    from vgg_gluon import imagefile  # the very decoding predict uses, so the export cannot drift
    (out_dir / "vgg_image.py").write_text(Path(imagefile.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    return {"symbol": out_dir / info["symbol"], "params": out_dir / info["params"],
            "preprocessing": out_dir / "preprocessing.json", "example": out_dir / "serve_example.py",
            "decoder": out_dir / "vgg_image.py"}


SERVE_EXAMPLE = '''"""Classify images with an exported vgg-gluon model: needs mxnet, numpy and Pillow only.

    python serve_example.py [--json] IMAGE [IMAGE ...]
"""
import json
import sys
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vgg_image import read_image  # noqa: E402
info = json.loads((HERE / "preprocessing.json").read_text())
with warnings.catch_warnings():  # MXNet warns that the input type is only known at the first call
    warnings.simplefilter("ignore", UserWarning)
    net = mx.gluon.SymbolBlock.imports(str(HERE / info["symbol"]), [info["input_name"]],
                                       str(HERE / info["params"]))


def preprocess(path):
    src = info["source_size"]
    # vgg_image.py (next to this file) decodes exactly as `vgg-gluon predict` does: EXIF orientation,
    # 16-bit grayscale, palettes, then grayscale or RGB at the data set's size.
    x = read_image(path, info["channels"], src).astype(np.float32).transpose(2, 0, 1)[None]
    mean = np.array(info["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(info["std"], np.float32).reshape(1, -1, 1, 1)
    x = mx.nd.array(x)
    if info["image_size"] and info["image_size"] != src:
        x = mx.nd.contrib.BilinearResize2D((x - mx.nd.array(mean)) / mx.nd.array(std),
                                           height=info["image_size"], width=info["image_size"])
        return x
    pad = (info["pad_to"] or src) - src
    if pad > 0:
        top, left = pad // 2, pad // 2
        x = mx.nd.pad(x, mode="constant", constant_value=0,
                      pad_width=(0, 0, 0, 0, top, pad - top, left, pad - left))
    return (x - mx.nd.array(mean)) / mx.nd.array(std)


as_json = "--json" in sys.argv[1:]   # one JSON object per image with every class's probability
for path in (a for a in sys.argv[1:] if a != "--json"):
    p = mx.nd.softmax(net(preprocess(path)), axis=1).asnumpy()[0]
    best = int(p.argmax())
    if as_json:
        print(json.dumps({"file": path, "probabilities": dict(zip(info["classes"], map(float, p)))}))
    else:
        print(f"{path}: {info['classes'][best]} {p[best]:.3f}")
'''


# ------------------------------------------------------------------------------------------------
# visual report
def split_probabilities(net, split, prep: Dict[str, Any], ctx, batch_size: int = 256) -> np.ndarray:
    """Softmax outputs for every image of a data split (in order)."""
    return probabilities(net, split.images, prep, ctx, batch_size=batch_size)


def write_report(run_dir: Path, net, dataset, prep: Dict[str, Any], ctx, *, checkpoint_name: str = "",
                 epoch: Optional[int] = None) -> Dict[str, Path]:
    """curves.png, confusion.png, mistakes.png and report.md in run_dir, for `net` on dataset.test."""
    from vgg_gluon import report
    run_dir = Path(run_dir)
    probs = split_probabilities(net, dataset.test, prep, ctx)
    truth = np.asarray(dataset.test.labels, dtype=np.int64)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    classes = list(prep["classes"])
    k = len(classes)
    confusion = report.confusion_matrix(truth, pred, k)
    history = report.read_history(run_dir / "history.csv")
    out: Dict[str, Path] = {}
    if history:
        report.plot_curves(run_dir / "curves.png", history)
        out["curves"] = run_dir / "curves.png"
    report.plot_confusion(run_dir / "confusion.png", confusion, classes)
    out["confusion"] = run_dir / "confusion.png"
    wrong = np.flatnonzero(pred != truth)
    # The most confident mistakes first: the instructive ones.
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")] if len(wrong) else wrong
    report.plot_mistakes(run_dir / "mistakes.png", dataset.test.images, truth, pred, probs, classes, wrong)
    out["mistakes"] = run_dir / "mistakes.png"
    report.write_report_md(run_dir / "report.md", run_name=run_dir.name, classes=classes, confusion=confusion,
                           history=history, checkpoint_name=checkpoint_name, epoch=epoch,
                           images=[p.name for p in out.values()], dataset=prep.get("dataset", ""),
                           mistakes=len(wrong))
    out["report"] = run_dir / "report.md"
    return out


def report_for_run(run_dir: Path, which: str = "best", data_dir: Optional[str] = None, ctx=None,
                   test_limit: Optional[int] = None) -> Dict[str, Path]:
    """`vgg-gluon report RUN`: load the run's data set and checkpoint, write the report."""
    from vgg_gluon import data as data_mod
    model = load_run_model(run_dir, which, ctx)
    cfg = model.cfg
    folder = data_dir or cfg.data_dir
    dataset = data_mod.load_dataset(cfg.dataset, Path(folder) if folder else None,
                                    train_limit=cfg.train_limit, test_limit=test_limit or cfg.test_limit,
                                    val_split=cfg.val_split, seed=cfg.seed)
    return write_report(run_dir, model.net, dataset, model.prep, model.ctx,
                        checkpoint_name=model.checkpoint.name, epoch=model.checkpoint.epoch)


def report_after_training(session, run_dir: Path) -> Dict[str, Path]:
    """Called when a run finishes: the best checkpoint's weights on the session's own test data."""
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine
    c = ck.select_checkpoint(Path(run_dir), "best")
    engine.load_checkpoint_params(session.net, c.file(ck.PARAMS), session.ctx_list)
    return write_report(run_dir, session.net, session.dataset, session.preprocessing(), session.ctx_list[0],
                        checkpoint_name=c.name, epoch=c.epoch)


def report_after_training_safely(session, run_dir: Path, say) -> None:
    """report_after_training, but a failure is one warning line: it must never fail the run."""
    import time
    t0 = time.time()
    try:
        files = report_after_training(session, run_dir)
    except Exception as exc:  # noqa: BLE001 - the run is done; the pictures are a bonus
        say(f"warning: report not written ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"retry with `vgg-gluon report {run_dir}`", err=True)
        return
    say(f"report: {files['report']} ({', '.join(p.name for k, p in files.items() if k != 'report')}, "
        f"{time.time() - t0:.1f}s)")
