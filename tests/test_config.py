from pathlib import Path

import pytest

from vgg_gluon.cli import resolve_config
from vgg_gluon.config import ConfigError, RunConfig, load_yaml
from vgg_gluon.runtime import RuntimeSetupError, parse_ctx

REPO = Path(__file__).resolve().parents[1]


def test_precedence_defaults_recipe_yaml_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("dataset: cifar10\nlr: 0.2\nepochs: 7\n")
    cfg = resolve_config(str(y), {"epochs": 3})
    assert cfg.dataset == "cifar10"
    assert cfg.lr == 0.2                # from YAML
    assert cfg.epochs == 3              # flag beats YAML
    assert cfg.augment_crop == 4 and cfg.augment_flip  # cifar10 recipe default
    assert cfg.width == RunConfig().width             # plain default


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "d2l_vgg11_224"])
def test_shipped_experiments_are_valid(name):
    cfg = resolve_config(str(REPO / "experiments" / f"{name}.yaml"), {})
    assert cfg.dataset in ("fashion-mnist", "cifar10")


def test_d2l_recipe_is_the_tutorials():
    cfg = RunConfig.from_yaml(REPO / "experiments" / "d2l_vgg11_224.yaml")
    assert (cfg.width, cfg.batch_norm, cfg.image_size, cfg.lr, cfg.epochs, cfg.fc_units) == \
        (0.25, False, 224, 0.05, 5, 4096)


@pytest.mark.parametrize("values, words", [
    ({"epochs": 0}, "epochs must be positive"),
    ({"batch_size": -1}, "batch_size must be positive"),
    ({"lr": 0}, "lr must be positive"),
    ({"arch": "vgg12"}, "arch 'vgg12' is not one of"),
    ({"dataset": "mnist"}, "dataset 'mnist' is not one of"),
    ({"image_size": 16}, "at least 32"),
    ({"dropout": 1.0}, "dropout"),
    ({"warmup_epochs": 20, "epochs": 10}, "warmup_epochs"),
    ({"lr_steps": [5, 3]}, "lr_steps"),
])
def test_bad_values_are_one_line_errors(values, words):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(values).validate()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        RunConfig.from_dict({"epoch": 3})


def test_type_errors_name_the_setting():
    with pytest.raises(ConfigError, match="batch_size must be a whole number"):
        RunConfig.from_dict({"batch_size": "many"})
    assert RunConfig.from_dict({"batch_norm": "no"}).batch_norm is False
    assert RunConfig.from_dict({"lr_steps": "10,20"}).lr_steps == [10, 20]


def test_yaml_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(lst)
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml(tmp_path / "missing.yaml")


def test_config_yaml_round_trip():
    cfg = RunConfig(dataset="cifar10", lr_steps=[3, 6], image_size=96)
    again = RunConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("spec, expected", [
    ("auto", ["auto"]), ("cpu", ["cpu:0"]), ("gpu", ["gpu:0"]), ("gpu:0,1", ["gpu:0", "gpu:1"]),
    ("CPU:0, 1", ["cpu:0", "cpu:1"]),
])
def test_parse_ctx(spec, expected):
    assert parse_ctx(spec) == expected


@pytest.mark.parametrize("spec", ["tpu", "gpu:", "gpu:a", "cpu:0,0", "gpu0"])
def test_parse_ctx_rejects(spec):
    with pytest.raises(RuntimeSetupError):
        parse_ctx(spec)


def test_gpu_request_without_cuda_is_clear():
    import mxnet as mx

    from vgg_gluon.runtime import resolve_ctx
    if mx.runtime.Features().is_enabled("CUDA"):
        pytest.skip("this MXNet has CUDA")
    with pytest.raises(RuntimeSetupError, match="no CUDA"):
        resolve_ctx("gpu:0,1")


def test_gpu_error_messages_map_to_fixes():
    from vgg_gluon.runtime import explain_mxnet_error
    assert "Hopper" in explain_mxnet_error(RuntimeError("CUDA: no kernel image is available for execution"))
    assert "driver" in explain_mxnet_error(OSError("libcuda.so.1: cannot open shared object file"))
    assert "smaller --batch-size" in explain_mxnet_error(RuntimeError("cudaMalloc retry failed: out of memory"))
    assert explain_mxnet_error(ValueError("something else")) is None
