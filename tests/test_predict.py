"""`vgg-gluon predict` and `vgg-gluon export` against a tiny trained run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import invoke_cli, tiny_args
from PIL import Image

TINY = tiny_args(train_limit=128)


def _invoke(*args, **kw):
    return invoke_cli(*args, mix_stderr=False, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data_dir):
    out = tmp_path_factory.mktemp("runs")
    r = _invoke("train", *TINY, "--epochs", 1, "--output-dir", out, "--name", "run", data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output + r.stderr
    return out / "run"


@pytest.fixture(scope="module")
def reference(run, tiny_data_dir):
    """The run's network on the first test images through the training pipeline (BatchLoader)."""
    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine
    from vgg_gluon.config import RunConfig
    c = ck.select_checkpoint(run, "best")
    cfg = RunConfig.from_dict(c.meta()["config"]).update({"data_dir": str(tiny_data_dir), "ctx": "cpu"})
    s = engine.build_session(cfg, train=False, params_source=c)
    data, _ = next(s.eval_loader.epoch(0))
    probs = engine.mx.nd.softmax(s.net(data[0]), axis=1).asnumpy()
    return s.dataset.test.images, probs, data[0].asnumpy(), list(s.dataset.classes)


def test_predict_matches_training_pipeline(run, reference, tmp_path):
    images, probs, _, classes = reference
    files = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(images[i][..., 0], "L").save(p)
        files.append(p)
    r = _invoke("predict", run, *files, "--top-k", 3, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    out = json.loads(r.output)
    assert out["errors"] == [] and len(out["predictions"]) == 4
    for i, pred in enumerate(out["predictions"]):
        assert len(pred["top"]) == 3
        order = np.argsort(-probs[i], kind="stable")[:3]
        assert [t["index"] for t in pred["top"]] == list(order)
        assert [t["class"] for t in pred["top"]] == [classes[j] for j in order]
        np.testing.assert_allclose([t["probability"] for t in pred["top"]], probs[i][order], rtol=1e-4, atol=1e-6)


def _mode_files(folder, g):
    """The same picture (uint8 (H, W) or (H, W, 3)) in many modes and containers; name -> path.
    All lossless but the JPEG; 'rotated' is stored turned by 90 degrees with the EXIF orientation
    tag that turns it back (as phones write photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = g if g.ndim == 3 else np.stack([g] * 3, -1)
    gray = g if g.ndim == 2 else None
    files = {}

    def save(name, im, **kw):
        files[name] = folder / name
        im.save(files[name], **kw)
    save("rgb.png", Image.fromarray(rgb, "RGB"))
    save("rgba.png", Image.fromarray(rgb, "RGB").convert("RGBA"))
    save("palette.png", Image.fromarray(rgb, "RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
         if gray is None else Image.fromarray(gray, "L").convert("P"))
    exif = Image.Exif()
    exif[0x0112] = 6            # "rotate 90 degrees clockwise to display"
    save("rotated.png", Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)), "RGB"), exif=exif)
    save("photo.jpg", Image.fromarray(rgb, "RGB"), quality=95)
    if gray is not None:
        save("gray.png", Image.fromarray(gray, "L"))
        save("gray_alpha.png", Image.fromarray(gray, "L").convert("LA"))
        save("sixteen.png", Image.fromarray(gray.astype(np.uint16) * 257, "I;16"))
        save("int32.tif", Image.fromarray(gray.astype(np.int32), "I"))
        save("float.tif", Image.fromarray(gray.astype(np.float32), "F"))
    return files


def test_every_image_mode_decodes_to_the_training_pixels(run, reference, tmp_path):
    """A Fashion-MNIST run: the file of a test image, in any mode, decodes to exactly the 28x28
    pixels training read from the idx file (the JPEG within its compression error), and predict
    gives exactly the probabilities of the training pipeline for it."""
    from vgg_gluon.inspection import decode_image
    images, probs, _, _ = reference
    files = _mode_files(tmp_path / "in", images[0][..., 0])
    for name, path in files.items():
        got = decode_image(path, 1, 28)
        assert got.shape == (28, 28, 1) and got.dtype == np.uint8, name
        if name.endswith(".jpg"):
            assert np.abs(got.astype(int) - images[0]).max() <= 12, name
        else:
            np.testing.assert_array_equal(got, images[0], err_msg=name)
    lossless = sorted(p for n, p in files.items() if not n.endswith(".jpg"))
    out = json.loads(_invoke("predict", run, *lossless, "--top-k", 10, "--json").output)
    for pred in out["predictions"]:
        got = sorted((t["index"], t["probability"]) for t in pred["top"])
        np.testing.assert_allclose([p for _, p in got], probs[0], rtol=1e-4, atol=1e-6, err_msg=pred["file"])


def test_every_image_mode_decodes_as_an_image_folder_does(tmp_path):
    """A CIFAR-10-style (image folder) run: predict decodes each file, of any mode and size, to the
    pixels the training data holds for the same file (data.load_dataset of a folder of them)."""
    from conftest import make_patterns

    from vgg_gluon import data
    from vgg_gluon.inspection import decode_image
    imgs, _ = make_patterns(2, 5, size=32, channels=3)
    root = tmp_path / "data" / "cifar10"
    files = _mode_files(root / "train" / "a", imgs[0])
    gray = imgs[1][..., 0]
    for name, path in _mode_files(tmp_path / "g", gray).items():   # grayscale sources as well
        files["g_" + name] = path.rename(root / "train" / "a" / ("g_" + name))
    Image.fromarray(imgs[1], "RGB").resize((50, 70), Image.BILINEAR).save(root / "train" / "a" / "z_big.png")
    files["z_big.png"] = root / "train" / "a" / "z_big.png"
    (root / "test" / "a").mkdir(parents=True)
    Image.fromarray(imgs[0], "RGB").save(root / "test" / "a" / "t.png")
    ds = data.load_dataset("cifar10", tmp_path / "data", download=False)
    trained = dict(zip(sorted(files), ds.train.images))      # the folder is read in name order
    assert len(ds.train.images) == len(files)
    for name, path in files.items():
        np.testing.assert_array_equal(decode_image(path, 3, 32), trained[name], err_msg=name)
    np.testing.assert_array_equal(trained["rotated.png"], imgs[0])
    np.testing.assert_array_equal(trained["g_sixteen.png"][..., 0], gray)


def test_predict_any_size_and_mode_and_bad_files(run, reference, tmp_path):
    images, probs, _, classes = reference
    folder = tmp_path / "in"
    _mode_files(folder, images[0][..., 0])
    g = images[0][..., 0]
    Image.fromarray(g, "L").resize((112, 112), Image.NEAREST).convert("RGB").save(folder / "big_rgb.png")
    (folder / "notes.png").write_text("not an image")
    good = folder / "rgba.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    r = _invoke("predict", run, folder, tmp_path / "missing.png")
    assert r.exit_code == 1
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 3 and all(ln.startswith("Error: ") for ln in err), r.stderr
    assert any("notes.png" in ln and "not an image" in ln for ln in err)
    assert any("truncated.png" in ln for ln in err) and any("missing.png" in ln for ln in err)
    lines = r.output.strip().splitlines()
    assert len(lines) == 11, lines  # the 10 modes and big_rgb
    assert "Traceback" not in r.output + r.stderr


def test_predict_cifar_style_run_is_rgb(tmp_path):
    """A 3-channel run turns a grayscale file into RGB 32x32 (honouring image_size)."""
    from vgg_gluon.inspection import decode_image, source_size
    p = tmp_path / "g.png"
    Image.fromarray(np.full((50, 70), 128, np.uint8), "L").save(p)
    a = decode_image(p, 3, source_size("cifar10"))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and (a == 128).all()
    assert decode_image(p, 1, source_size("fashion-mnist")).shape == (28, 28, 1)


def test_export_loads_with_symbolblock_and_matches(run, reference, tmp_path):
    import mxnet as mx

    from vgg_gluon.inspection import load_run_model
    _, probs, batch, classes = reference
    out = tmp_path / "export"
    r = _invoke("export", run, out)
    assert r.exit_code == 0, r.output + r.stderr
    info = json.loads((out / "preprocessing.json").read_text())
    assert info["classes"] == classes and info["channels"] == 1 and info["size"] == 32
    assert info["pad_to"] == 32 and info["source_size"] == 28 and len(info["mean"]) == 1
    net = mx.gluon.SymbolBlock.imports(str(out / "model-symbol.json"), ["data"], str(out / "model-0000.params"))
    got = mx.nd.softmax(net(mx.nd.array(batch)), axis=1).asnumpy()
    np.testing.assert_allclose(got, probs, rtol=1e-4, atol=1e-6)
    own = load_run_model(run, "best").net
    np.testing.assert_allclose(mx.nd.softmax(own(mx.nd.array(batch)), axis=1).asnumpy(), got, rtol=1e-4, atol=1e-6)


def test_serve_example_needs_only_mxnet_and_pillow(run, reference, tmp_path):
    images, probs, _, classes = reference
    out = tmp_path / "export"
    assert _invoke("export", run, out).exit_code == 0
    img = tmp_path / "x.png"
    Image.fromarray(images[1][..., 0], "L").save(img)
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-I", str(out / "serve_example.py"), str(img)], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    name, p = proc.stdout.strip().split(": ", 1)[1].rsplit(" ", 1)
    assert name == classes[int(np.argmax(probs[1]))]
    assert abs(float(p) - probs[1].max()) < 2e-3


def test_float16_run_is_loaded_as_float32(run, reference, tmp_path):
    """A --dtype float16 run (weights saved in float16; CPUs cannot train one) predicts and exports
    in float32."""
    import shutil

    import mxnet as mx

    from vgg_gluon import checkpoint as ck
    from vgg_gluon.inspection import load_run_model
    _, probs, batch, _ = reference
    copy = tmp_path / "fp16"
    shutil.copytree(run, copy)
    c = ck.select_checkpoint(copy, "best")
    net = load_run_model(copy, "best").net
    net.cast("float16")
    net.save_parameters(str(c.file(ck.PARAMS)))
    meta = json.loads(c.file(ck.META).read_text())
    meta["config"]["dtype"] = "float16"
    c.file(ck.META).write_text(json.dumps(meta))
    files = {n: {"sha256": ck.sha256_file(c.file(n)), "size": c.file(n).stat().st_size}
             for n in (ck.PARAMS, ck.STATES, ck.META)}
    c.file(ck.MANIFEST).write_text(json.dumps({"format_version": ck.FORMAT_VERSION, "files": files}))
    model = load_run_model(copy, "best")
    assert model.checkpoint.path == c.path and model.cfg.dtype == "float16"
    got = mx.nd.softmax(model.net(mx.nd.array(batch)), axis=1).asnumpy()
    np.testing.assert_allclose(got, probs, atol=2e-2)
    assert _invoke("export", copy, tmp_path / "exp").exit_code == 0


def test_to_input_pads_or_resizes_like_training():
    import mxnet as mx

    from vgg_gluon.inspection import to_input
    img = np.random.default_rng(0).integers(0, 255, (2, 28, 28, 1)).astype(np.uint8)
    prep = {"mean": [70.0], "std": [90.0], "pad_to": 32, "image_size": None}
    x = to_input(img, prep, mx.cpu()).asnumpy()
    assert x.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(x[:, :, 0, :], -70.0 / 90.0, rtol=1e-6)       # zero padding, normalized
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30], (img[..., 0] - 70.0) / 90.0, rtol=1e-5, atol=1e-6)
    assert to_input(img, dict(prep, image_size=96), mx.cpu()).shape == (2, 1, 96, 96)


def test_rgb_run_with_image_size_and_three_classes(tmp_path, monkeypatch):
    """An image-folder 'cifar10' run (RGB, 3 classes, --image-size 40): predict == training pipeline."""
    from conftest import make_patterns

    from vgg_gluon import checkpoint as ck
    from vgg_gluon import engine
    from vgg_gluon.config import RunConfig
    data = tmp_path / "data"
    for split, n, seed in (("train", 96, 1), ("test", 12, 2)):
        imgs, labels = make_patterns(n, seed, size=32, channels=3)
        for i, (im, lab) in enumerate(zip(imgs, labels % 3)):
            d = data / "cifar10" / split / f"class{lab}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im, "RGB").save(d / f"{i}.png")
    monkeypatch.setenv("VGG_GLUON_DATA_DIR", str(data))
    r = _invoke("train", "--dataset", "cifar10", "--width", "0.0625", "--fc-units", "16", "--batch-size", "32",
                "--image-size", "40", "--epochs", "1", "--quiet", "--output-dir", tmp_path, "--name", "rgb")
    assert r.exit_code == 0, r.output + r.stderr
    run = tmp_path / "rgb"
    c = ck.select_checkpoint(run, "best")
    cfg = RunConfig.from_dict(c.meta()["config"]).update({"ctx": "cpu"})
    s = engine.build_session(cfg, train=False, params_source=c)
    data_batch, _ = next(s.eval_loader.epoch(0))
    assert data_batch[0].shape[1:] == (3, 40, 40)
    probs = engine.mx.nd.softmax(s.net(data_batch[0]), axis=1).asnumpy()
    files = []
    for i in range(3):
        files.append(tmp_path / f"t{i}.png")
        Image.fromarray(s.dataset.test.images[i], "RGB").save(files[-1])
    out = json.loads(_invoke("predict", run, *files, "--json", "--top-k", 5).output)
    for i, pred in enumerate(out["predictions"]):
        assert len(pred["top"]) == 3  # only 3 classes
        assert pred["top"][0]["class"] == s.dataset.classes[int(np.argmax(probs[i]))]
        np.testing.assert_allclose(pred["top"][0]["probability"], probs[i].max(), rtol=1e-4)
    summary = json.loads(_invoke("summary", run, "--json").output)
    assert summary["input_shape"] == [1, 3, 40, 40] and summary["rows"][-1]["output_shape"] == [1, 3]
