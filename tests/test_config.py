import os
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
    assert cfg.augment_crop == 2 and cfg.alternate_flip and cfg.arch == "fast3"  # cifar10 recipe default
    assert cfg.dropout == RunConfig().dropout         # plain default


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_a_classic_row_on_cifar10_gets_the_classic_recipe(tmp_path, where):
    """The cifar10 recipe is a fast row with a whitened patch stem; a classic row typed on the
    command line or named in a recipe file gets experiments/cifar10_vgg11.yaml's settings, not a
    refusal of a whitening setting the user never wrote."""
    if where == "flag":
        cfg = resolve_config(None, {"dataset": "cifar10", "arch": "vgg16"})
    else:
        y = tmp_path / "r.yaml"
        y.write_text("dataset: cifar10\narch: vgg16\n")
        cfg = resolve_config(str(y), {})
    classic = resolve_config(str(REPO / "experiments" / "cifar10_vgg11.yaml"), {"arch": "vgg16"})
    assert cfg.to_dict() == classic.to_dict()
    assert cfg.arch == "vgg16" and not cfg.whiten and cfg.augment_crop == 4 and cfg.optimizer == "sgd"
    fast = resolve_config(None, {"dataset": "cifar10", "arch": "fast3s"})
    assert fast.whiten and fast.arch == "fast3s" and fast.lookahead   # another fast row keeps it


def test_fast_rows_take_images_down_to_9_px():
    RunConfig(arch="fast3", image_size=28).validate()
    RunConfig(arch="fast3s", image_size=9).validate()
    with pytest.raises(ConfigError, match="at least 32"):
        RunConfig(arch="vgg11", image_size=28).validate()
    with pytest.raises(ConfigError, match="at least 9"):
        RunConfig(arch="fast3", image_size=8).validate()


def test_idle_cores_count_steal_time_as_idle(monkeypatch):
    """/proc/stat: user nice system idle iowait irq softirq steal. Steal is other guests on the
    hypervisor, not a process our threads would fight: 2 CPUs, 100 user + 150 idle + 50 steal
    ticks -> (150 + 50) / 300 x 2 = 1.33 idle cores (one thread would be chosen without it)."""
    import io

    from vgg_gluon import _env
    readings = iter(["cpu  100 0 100 1000 0 0 0 0 0 0\n", "cpu  200 0 100 1150 0 0 0 50 0 0\n"])
    monkeypatch.setattr(_env, "open", lambda *a, **k: io.StringIO(next(readings)), raising=False)
    monkeypatch.setattr(_env.os, "cpu_count", lambda: 2)
    assert _env.idle_cores(0.0) == pytest.approx(200 / 300 * 2)


def test_default_threads_take_a_second_look_before_giving_fewer(monkeypatch):
    """A blip in the first 0.1 s sample must not cost a whole run a thread; a machine busy in
    both looks gets fewer threads, and an idle one is looked at once."""
    from vgg_gluon import _env
    monkeypatch.setattr(_env, "cpu_count", lambda: 2)
    looks = []

    def fake(samples):
        def idle_cores(seconds=0.1):
            looks.append(seconds)
            return samples[len(looks) - 1]
        return idle_cores
    monkeypatch.setattr(_env, "idle_cores", fake([0.9, 2.0]))
    assert _env.default_threads() == 2 and looks == [0.1, 0.4]
    looks.clear()
    monkeypatch.setattr(_env, "idle_cores", fake([0.9, 1.0]))
    assert _env.default_threads() == 1 and len(looks) == 2
    looks.clear()
    monkeypatch.setattr(_env, "idle_cores", fake([1.9]))
    assert _env.default_threads() == 2 and looks == [0.1]


def test_amx_is_asked_for_only_where_the_cpu_has_it_and_the_users_isa_cap_wins(monkeypatch):
    """configure() opens oneDNN's AMX kernels (DNNL_MAX_CPU_ISA) only when Linux granted the tile
    state; a cap the user exported stays as it is."""
    import subprocess
    import sys

    from vgg_gluon import _env
    amx_here = _env.request_amx()  # this CPU has AMX and Linux grants it (a child gets the same answer)
    monkeypatch.setattr(_env, "_AMX", {"granted": None})
    monkeypatch.setattr(_env, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert _env.request_amx() is False and _env.onednn_uses_amx() is False
    code = "import os, vgg_gluon._env as e; print(os.environ.get('DNNL_MAX_CPU_ISA'), e.onednn_uses_amx())"
    for cap in (None, "AVX2"):
        env = {k: v for k, v in os.environ.items() if k not in ("DNNL_MAX_CPU_ISA", "MKLDNN_MAX_CPU_ISA")}
        if cap:
            env["DNNL_MAX_CPU_ISA"] = cap
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        if cap:
            assert out == [cap, "False"], out
        else:
            assert out == (["AVX512_CORE_AMX", "True"] if amx_here else ["None", "False"]), out


def test_make_train_cifar10_picks_the_bfloat16_recipe_only_where_amx_runs():
    """`make train DATASET=cifar10` trains experiments/cifar10_amx.yaml where a run would get AMX
    (the Makefile asks `vgg_gluon/_env.py amx`, with the system Python), and the float32 default
    elsewhere, or when the user caps oneDNN below AMX or names CONFIG; Fashion-MNIST is unchanged."""
    import shutil
    import subprocess
    import sys

    from vgg_gluon import _env
    if shutil.which("make") is None:
        pytest.skip("no make here")
    amx_here = _env.request_amx()
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DNNL_MAX_CPU_ISA", "MKLDNN_MAX_CPU_ISA", "CONFIG", "DATASET")}

    def dry_run(*args, **env):
        out = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "train", *args], env={**clean, **env},
                             capture_output=True, text=True, check=True).stdout
        said["amx"] = "this CPU has AMX" in out
        return [line for line in out.splitlines() if " train --config " in line][-1].split()[3]

    said = {}
    amx_config = "experiments/cifar10_amx.yaml" if amx_here else "experiments/cifar10.yaml"
    assert dry_run("DATASET=cifar10") == amx_config and said["amx"] == amx_here
    # named by the user: trained as asked (refused in one line by the CLI where AMX is missing), no claim
    assert dry_run("DATASET=cifar10", "CONFIG=experiments/cifar10_amx.yaml") == "experiments/cifar10_amx.yaml"
    assert not said["amx"]
    assert dry_run("DATASET=cifar10", DNNL_MAX_CPU_ISA="AVX512_CORE_BF16") == "experiments/cifar10.yaml"
    assert dry_run("DATASET=cifar10", "CONFIG=experiments/cifar10.yaml") == "experiments/cifar10.yaml"
    assert dry_run() == "experiments/fashion_mnist.yaml"
    out = subprocess.run([sys.executable, str(REPO / "vgg_gluon" / "_env.py"), "amx"], env=clean,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("amx" if amx_here else "")


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
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


def test_a_quick_trial_smaller_than_the_recipes_batch_takes_one_batch():
    """`--train-limit 128` of a recipe with batch 512: one batch of the 128 images; a batch size the
    user typed is kept (and refused later, with one line, if no full batch fits)."""
    assert resolve_config(None, {"train_limit": 128}).batch_size == 128
    assert resolve_config(None, {"train_limit": 128, "batch_size": 256}).batch_size == 256
    assert resolve_config(None, {"train_limit": 5000}).batch_size == 512
