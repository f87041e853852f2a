"""`vgg-gluon summary` and CLI polish (command suggestions, examples in every --help)."""
import json

from click.testing import CliRunner

from vgg_gluon import cli, models
from vgg_gluon import netsummary as NS


def _invoke(*args):
    return CliRunner(mix_stderr=False).invoke(cli.main, [str(a) for a in args])


def test_summary_vgg11_224_is_the_tutorial_table():
    r = _invoke("summary", "--arch", "vgg11", "--width", "1", "--image-size", "224", "--channels", "1",
                "--no-batch-norm", "--json")
    assert r.exit_code == 0, r.output + r.stderr
    s = json.loads(r.output)
    shapes = [tuple(row["output_shape"]) for row in s["rows"]]
    assert shapes == [(1, 64, 112, 112), (1, 128, 56, 56), (1, 256, 28, 28), (1, 512, 14, 14), (1, 512, 7, 7),
                      (1, 4096), (1, 4096), (1, 4096), (1, 4096), (1, 10)]
    assert s["input_shape"] == [1, 1, 224, 224]
    # the well-known VGG-11 numbers for one input channel and 10 classes
    net = models.build_vgg("vgg11", 10, width=1.0, batch_norm=False)
    assert s["total_params"] == NS.count_params(NS.layer_summary(net, (1, 224, 224)))
    assert s["total_macs"] == NS.count_macs("vgg11", 1.0, False, None, 10, (1, 224, 224))
    assert 128_000_000 < s["total_params"] < 129_000_000


def test_summary_text_layers_and_batch_norm():
    r = _invoke("summary", "--arch", "vgg11", "--width", "0.25", "--image-size", "224", "--channels", "1",
                "--batch-norm")
    assert r.exit_code == 0, r.output + r.stderr
    assert "(1, 16, 112, 112)" in r.output and "(1, 128, 7, 7)" in r.output and "(1, 10)" in r.output
    assert "features.block5" in r.output and "total" in r.output and "multiply-adds" in r.output
    r = _invoke("summary", "--arch", "vgg16", "--dataset", "cifar10", "--layers", "--json")
    s = json.loads(r.output)
    assert s["input_shape"] == [1, 3, 32, 32]
    kinds = [row["kind"] for row in s["rows"]]
    assert kinds.count("conv") == 13 and kinds.count("bn") == 13 and kinds.count("dense") == 3


def test_summary_config_and_bad_size():
    r = _invoke("summary", "--config", "experiments/d2l_vgg11_224.yaml", "--json")
    assert r.exit_code == 0, r.output + r.stderr
    s = json.loads(r.output)
    assert s["rows"][0]["output_shape"] == [1, 16, 112, 112] and s["fc_units"] == 4096
    for args in (["--arch", "vgg11", "--image-size", "16"], ["--image-size", "8"]):  # 32 px, 9 px (fast3)
        r = _invoke("summary", *args)
        assert r.exit_code == 2, args  # one line naming the option, no traceback
        assert "Traceback" not in r.output + r.stderr and "--image-size" in r.stderr, r.stderr


def test_misspelled_command_and_option_get_a_suggestion():
    r = _invoke("trian")
    assert r.exit_code == 2 and "Did you mean 'train'?" in r.stderr
    r = _invoke("sumary")
    assert "Did you mean 'summary'?" in r.stderr
    r = _invoke("train", "--epoch", "3")
    assert r.exit_code == 2 and "--epochs" in r.stderr


def test_every_command_help_has_examples():
    for name in cli.main.list_commands(None):
        r = _invoke(name, "--help")
        assert r.exit_code == 0, name
        assert "Examples:" in r.output, f"{name} --help has no Examples section"
