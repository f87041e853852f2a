"""Faults: real training processes killed with SIGKILL at many points, Ctrl-C and SIGTERM,
crashes at every stage of a save, disk full, and GPU failures that surface during training.

After every kill, `resume` must start from the newest complete checkpoint (the pointer's target;
for a crash between a checkpoint's commit and the pointer update, the previous one), never
load a partial file, and finish the run with a checkpoint that verifies, no `.tmp-*` left and
one history row per epoch.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXIT_INPUT, EXIT_USAGE, REPO, invoke_cli, one_line_error, tiny_args

from vgg_gluon import checkpoint as ck
from vgg_gluon import report

# 256 training images in batches of 8: 32 steps per epoch, so there are many points to hit.
TINY = tiny_args(batch_size=8, train_limit=None, log_interval=1, quiet=False)
STAGES = ["after-params", "after-states", "before-manifest", "before-pointer", "after-pointer"]


# ------------------------------------------------------------------------------------------------
# helpers
def _env(data_dir: Path, **extra) -> dict:
    env = dict(os.environ, VGG_GLUON_DATA_DIR=str(data_dir))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("VGG_GLUON_CRASH_AT", "VGG_GLUON_SLOW_AT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vgg_gluon", *map(str, args)], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgg_gluon", *map(str, args)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def _wait(cond, proc=None, timeout=120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(cond())
        time.sleep(0.01)
    return False


def _kill(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"process ended by itself ({proc.returncode}):\n{err}"
    return err


def _pointer(run: Path):
    try:
        return json.loads((run / "last.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None


def _temps(run: Path):
    return sorted(p.name for p in run.glob(".tmp-*"))


def _resumed_from(run: Path) -> str:
    """The checkpoint named by the last `resuming ... from X` line of train.log."""
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if " from epoch-" in ln]
    assert lines, (run / "train.log").read_text()
    return re.search(r" from (epoch-[0-9-step]+)", lines[-1]).group(1)


def _after_kill(run: Path):
    """Invariants that must hold whenever a process dies: the pointer's target is complete, and
    anything under a final checkpoint name is complete. Returns the checkpoint resume must pick."""
    for c in ck.list_checkpoints(run):
        ck.verify(c)                                  # never a partial checkpoint under a real name
    ptr = ck.read_pointer(run, "last")
    if ptr is None:
        return None
    ck.verify(ptr)
    newer = [c.name for c in ck.list_checkpoints(run) if (c.epoch, c.step) > (ptr.epoch, ptr.step)]
    assert len(newer) <= 1, newer                    # at most the one committed just before the crash
    return ptr.name


def _finish(run: Path, env: dict, epochs: int) -> subprocess.CompletedProcess:
    """Resume to the end and check the whole run: verified, no temporaries, complete history."""
    r = _run(["resume", run, "--epochs", epochs], env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    c = ck.select_checkpoint(run, "last")
    ck.verify(c)
    assert (c.epoch, c.step) == (epochs, 0)
    assert _temps(run) == []
    assert [h["epoch"] for h in report.read_history(run / "history.csv")] == list(range(1, epochs + 1))
    return r


def _tree_hash(root: Path) -> dict:
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _invoke(*args):
    return invoke_cli(*args)


def _one_line_error(r, *words):
    """The refusals in this file are problems with input (files, data, devices, disk): exit 1."""
    return one_line_error(r, EXIT_INPUT, *words)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_data_dir):
    """A run with one committed epoch (in-process, so it is quick)."""
    out = tmp_path_factory.mktemp("base")
    r = invoke_cli("train", *TINY, "--epochs", 1, "--quiet", "--output-dir", out, "--name", "base",
                   data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output
    return out / "base"


@pytest.fixture(scope="module")
def two_epoch_run(base_run, tiny_data_dir):
    run = base_run.parent / "two"
    shutil.copytree(base_run, run)
    r = invoke_cli("resume", run, "--epochs", 2, "--quiet", data_dir=tiny_data_dir)
    assert r.exit_code == 0, r.output
    return run


# ------------------------------------------------------------------------------------------------
# 1. SIGKILL inside a save, at every stage (test-only hook VGG_GLUON_CRASH_AT)
@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_crash_at_every_stage_of_a_save(stage, base_run, tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    env = _env(tiny_data_dir)
    r = _run(["resume", run, "--epochs", 2], _env(tiny_data_dir, VGG_GLUON_CRASH_AT=stage))
    assert r.returncode == -signal.SIGKILL, r.stderr
    expected = "epoch-0002" if stage == "after-pointer" else "epoch-0001"
    assert _after_kill(run) == expected
    if stage in ("after-params", "after-states", "before-manifest"):
        assert _temps(run), "the interrupted save should have left its temporary folder"
        assert not (run / "epoch-0002").exists()
    if stage == "before-pointer":
        assert (run / "epoch-0002").is_dir()          # committed, but the pointer never moved
    _finish(run, env, 3)
    assert _resumed_from(run) == expected
    if stage == "before-pointer":
        # The unpointed copy of epoch 2 is kept aside, not deleted.
        assert list(run.glob("epoch-0002.replaced-*"))


def test_crash_in_the_second_save_of_a_process(tiny_data_dir, tmp_path):
    """stage@N: the N-th save of one process; here epoch 2's, with epoch 1 committed before it.
    (The fast suite's case of the kills inside a save; test_crash_at_every_stage_of_a_save has them all.)"""
    env = _env(tiny_data_dir)
    r = _run(["train", *TINY, "--epochs", 2, "--output-dir", tmp_path, "--name", "run"],
             _env(tiny_data_dir, VGG_GLUON_CRASH_AT="before-manifest@2"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    run = tmp_path / "run"
    assert _after_kill(run) == "epoch-0001"
    _finish(run, env, 2)
    assert _resumed_from(run) == "epoch-0001"


def test_kill9_mid_epoch_then_resume_finishes(tiny_data_dir, tmp_path):
    """The fast suite's case of the kills by timing (test_kill9_at_many_points_then_resume_finishes
    has eleven): SIGKILL 40% into epoch 2, after epoch 1's commit; resume starts from epoch-0001
    and finishes with a complete, verified run."""
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", 2, "--output-dir", tmp_path, "--name", "run"],
                  _env(tiny_data_dir, VGG_GLUON_SLOW_AT="train-step:0.03"))   # an epoch >= 1 s
    _wait_epoch_line(run, 1, proc)
    time.sleep(0.4 * _epoch_seconds(run, 1.0))
    _kill(proc)
    assert _after_kill(run) == "epoch-0001" and not (run / "epoch-0002").exists()
    _finish(run, _env(tiny_data_dir), 2)
    assert _resumed_from(run) == "epoch-0001"
    assert ck.select_checkpoint(run).meta()["num_update"] == 2 * 32    # epoch 1 was not trained twice


# ------------------------------------------------------------------------------------------------
# 2. SIGKILL by timing: during start-up, inside epoch 1, between epochs, mid-epoch, inside saves
KILL_PLAN = [
    # (name, extra env, when to kill)
    ("epoch 1, before any checkpoint", {}, "first-epoch"),
    ("between epochs (right after a commit)", {}, "after-commit"),
    ("mid-epoch (40% of an epoch after a commit)", {}, ("after-commit", 0.4)),
    ("inside a save, weights written", {"VGG_GLUON_SLOW_AT": "after-params:1.0"}, "in-save"),
    ("inside a save, optimizer state written", {"VGG_GLUON_SLOW_AT": "after-states:1.0"}, "in-save"),
    ("inside a save, manifest not yet written", {"VGG_GLUON_SLOW_AT": "before-manifest:1.0"}, "in-save"),
    ("inside a save, committed but pointer not moved", {"VGG_GLUON_SLOW_AT": "before-pointer:1.0"},
     "committed-unpointed"),
    ("during start-up (loading data / building the net)", {}, ("startup", 1.0)),
    ("late in an epoch (90% after a commit)", {}, ("after-commit", 0.9)),
    ("mid-epoch (15% after a commit)", {}, ("after-commit", 0.15)),
    ("between epochs, pointer moved, retention pending", {"VGG_GLUON_SLOW_AT": "after-pointer:1.0"},
     "pointer-moved"),
]


@pytest.mark.slow
def test_kill9_at_many_points_then_resume_finishes(tiny_data_dir, tmp_path):
    run, epochs = tmp_path / "run", 12
    log_lines = []
    epoch_seconds = 2.0
    # Epoch 1 made >= 3.2 s long (0.1 s per step), so the first kill lands inside it on any machine.
    proc = _start(["train", *TINY, "--epochs", epochs, "--keep-last", 2, "--output-dir", tmp_path,
                   "--name", "run"], _env(tiny_data_dir, VGG_GLUON_SLOW_AT="train-step:0.1"))
    for i, (name, extra, when) in enumerate(KILL_PLAN):
        if i:  # every kill after the first lands in a resumed process
            expected = _pointer(run)
            proc = _start(["resume", run, "--epochs", epochs, "--keep-last", 2], _env(tiny_data_dir, **extra))
        else:
            expected = None
        before = _pointer(run)
        kind, frac = (when if isinstance(when, tuple) else (when, None))
        if kind == "first-epoch":
            assert _wait(lambda: (run / "train.log").exists(), proc)
            time.sleep(0.5)
            assert _pointer(run) is None, "epoch 1 finished before the kill; make it longer"
        elif kind == "startup":
            time.sleep(frac)
        elif kind == "after-commit":
            assert _wait(lambda b=before: _pointer(run) != b, proc), proc.communicate()
            if frac:
                time.sleep(frac * epoch_seconds)
        elif kind == "in-save":
            stage = extra["VGG_GLUON_SLOW_AT"].split(":")[0]
            marker = {"after-params": ck.PARAMS, "after-states": ck.STATES, "before-manifest": ck.META}[stage]
            assert _wait(lambda m=marker: any((p / m).exists() for p in run.glob(".tmp-epoch-*")), proc), \
                proc.communicate()
            time.sleep(0.2)
            assert not any((p / ck.MANIFEST).exists() for p in run.glob(".tmp-epoch-*"))
        elif kind == "committed-unpointed":
            assert _wait(lambda b=before: any(c.name != b and (c.epoch, c.step) > _ep(b)
                                     for c in ck.list_checkpoints(run)), proc), proc.communicate()
            time.sleep(0.2)
            assert _pointer(run) == before
        elif kind == "pointer-moved":
            assert _wait(lambda b=before: _pointer(run) != b, proc), proc.communicate()
            time.sleep(0.2)
        _kill(proc)
        picked = _after_kill(run)
        log_lines.append(f"{name}: pointer {picked}, temporaries {_temps(run)}")
        if i and kind != "startup" and expected is not None:
            assert _resumed_from(run) == expected, name
        epoch_seconds = _epoch_seconds(run, epoch_seconds)
    r = _finish(run, _env(tiny_data_dir), epochs)
    print(f"{len(KILL_PLAN)} kill points:\n  " + "\n  ".join(log_lines))
    assert "Traceback" not in r.stderr


def _wait_epoch_line(run: Path, epoch: int, proc) -> None:
    """Until train.log has epoch `epoch`'s line: its checkpoint, history and plot are done, and
    the next epoch is starting."""
    def seen():
        try:
            return f"epoch {epoch:>3}/" in (run / "train.log").read_text()
        except OSError:
            return False
    assert _wait(seen, proc, timeout=180), proc.communicate()


def _epoch_seconds(run: Path, default: float) -> float:
    """Training time of an epoch as history.csv measured it (plus evaluation, roughly)."""
    rows = report.read_history(run / "history.csv")
    return 1.2 * max(r["seconds"] for r in rows) if rows else default


def _ep(name):
    m = ck.CKPT_RE.match(name or "")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


# ------------------------------------------------------------------------------------------------
# 3. Ctrl-C and SIGTERM
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130),
                                       pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_signal_mid_epoch_saves_that_step_and_resume_continues_there(sig, code, tiny_data_dir, tmp_path):
    # 0.05 s per step: an epoch of 32 steps takes >= 1.6 s, so the signal lands inside epoch 2 on a
    # fast machine as on a loaded one
    env, run = _env(tiny_data_dir, VGG_GLUON_SLOW_AT="train-step:0.05"), tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", 2, "--output-dir", tmp_path, "--name", "run"], env)
    _wait_epoch_line(run, 1, proc)
    time.sleep(0.3 * _epoch_seconds(run, 1.6))  # into epoch 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    c = ck.select_checkpoint(run)
    ck.verify(c)
    assert c.name == _pointer(run) and _temps(run) == []
    assert f"checkpoint {c.path}" in err and f"vgg-gluon resume {run}" in err
    assert c.epoch == 1 and 0 < c.step < 32, c.name   # a mid-epoch checkpoint of epoch 2
    assert f"stopped in epoch 2 after step {c.step}" in err
    _finish(run, _env(tiny_data_dir), 2)
    assert f"from {c.name} (epoch 2, step {c.step})" in (run / "train.log").read_text()


@pytest.mark.slow
def test_second_ctrl_c_during_the_save_does_not_corrupt(tiny_data_dir, tmp_path):
    """The save is slowed by the test hook; more signals arrive while it is in progress."""
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", 3, "--output-dir", tmp_path, "--name", "run"],
                  _env(tiny_data_dir, VGG_GLUON_SLOW_AT="after-states:1.5"))
    _wait_epoch_line(run, 1, proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert _wait(lambda: any((p / ck.STATES).exists() for p in run.glob(".tmp-epoch-*")), proc), \
        proc.communicate()
    for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
        proc.send_signal(s)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "still saving" in err and "Traceback" not in err
    c = ck.select_checkpoint(run)
    ck.verify(c)
    assert c.name == _pointer(run) != "epoch-0001" and _temps(run) == []
    _finish(run, _env(tiny_data_dir), 3)


def test_two_quick_ctrl_c(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", 3, "--output-dir", tmp_path, "--name", "run"], _env(tiny_data_dir))
    assert _wait(lambda: _pointer(run) == "epoch-0001", proc), proc.communicate()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ck.verify(ck.select_checkpoint(run))
    assert _temps(run) == []


def test_second_process_on_a_training_run_is_refused_and_touches_nothing(tiny_data_dir, tmp_path):
    """While a save is in progress (slowed by the hook), `resume` of the same run exits 1 with one
    line naming the holder's pid; it neither removes the save's temporary folder nor writes
    anything, .lock included. (That kill -9 drops the lock, so that resume then works, every
    kill-then-resume test shows.)"""
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", 1, "--output-dir", tmp_path, "--name", "run"],
                  _env(tiny_data_dir, VGG_GLUON_SLOW_AT="after-params:20"))
    try:
        assert _wait(lambda: any((p / ck.PARAMS).exists() for p in run.glob(".tmp-epoch-*")), proc), \
            proc.communicate()
        before = _tree_hash(run)     # once the weights are whole: the save then waits at after-params
        for _ in range(100):
            time.sleep(0.3)
            now, before = before, _tree_hash(run)
            if now == before:
                break
        r = _run(["resume", run, "--epochs", 1], _env(tiny_data_dir), timeout=120)
        assert r.returncode == 1, r.stderr
        line, = r.stderr.strip().splitlines()
        assert "in use by another vgg-gluon process" in line and f"pid {proc.pid}" in line, line
        assert _tree_hash(run) == before and _temps(run)
    finally:
        if proc.poll() is None:
            _kill(proc)


@pytest.mark.slow
def test_crash_inside_the_ctrl_c_save_keeps_the_previous_checkpoint(tiny_data_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", 3, "--output-dir", tmp_path, "--name", "run"],
                  _env(tiny_data_dir, VGG_GLUON_CRASH_AT="before-manifest@2"))
    _wait_epoch_line(run, 1, proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert _after_kill(run) == "epoch-0001"
    _finish(run, _env(tiny_data_dir), 2)
    assert _resumed_from(run) == "epoch-0001"


# ------------------------------------------------------------------------------------------------
# 4. bad files: one line naming the file, exit != 0, nothing written
DAMAGES = ["empty", "few-bytes", "half", "all-but-one", "flip"]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "few-bytes":
        data = data[:5]
    elif how == "half":
        data = data[: len(data) // 2]
    elif how == "all-but-one":
        data = data[:-1]
    elif how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "flip-header":
        data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def _rehash(ckpt_dir: Path, format_version: int = ck.FORMAT_VERSION) -> None:
    """Rewrite the manifest for the files as they are now (as a buggy tool or a person might)."""
    files = {n: {"sha256": ck.sha256_file(ckpt_dir / n), "size": (ckpt_dir / n).stat().st_size}
             for n in (ck.PARAMS, ck.STATES, ck.META)}
    (ckpt_dir / ck.MANIFEST).write_text(json.dumps({"format_version": format_version, "files": files}))


def _refused(run: Path, *words, commands=("resume", "evaluate")):
    # As a real run folder holds: RUN/.lock last taken by another process than this one (CliRunner
    # runs the commands in the test's own process), which a refused command must not rewrite.
    (run / ck.LOCK).write_text("4242")
    before = _tree_hash(run)
    lines = []
    for cmd in commands:
        args = ["resume", run, "--epochs", 3] if cmd == "resume" else ["evaluate", run, "--which", "last"]
        lines.append(_one_line_error(_invoke(*args), *words))
    assert _tree_hash(run) == before, "a refused run folder was modified"
    return lines


@pytest.mark.parametrize("victim", [ck.PARAMS, ck.STATES, ck.META, ck.MANIFEST])
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_only_checkpoint(victim, how, base_run, cli_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    _damage(run / "epoch-0001" / victim, how)
    for line in _refused(run, str(run / "epoch-0001")):
        assert re.search(r"corrupted|unreadable|incomplete manifest|not JSON|missing", line), line


@pytest.mark.parametrize("victim, how, words", [
    (ck.PARAMS, "empty", "cannot load weights"),
    (ck.PARAMS, "few-bytes", "cannot load weights"),
    (ck.PARAMS, "half", "cannot load weights"),
    (ck.PARAMS, "all-but-one", "cannot load weights"),
    (ck.PARAMS, "flip-header", "cannot load weights"),
    (ck.STATES, "empty", "optimizer state file is corrupted"),
    (ck.STATES, "few-bytes", "optimizer state file is corrupted"),
    (ck.STATES, "half", "optimizer state file is corrupted"),
    (ck.STATES, "all-but-one", "optimizer state file is corrupted"),
    (ck.STATES, "flip-header", "trainer.states"),
    (ck.META, "half", "not JSON"),
    (ck.META, "flip-header", "not JSON"),
])
def test_damage_behind_a_consistent_manifest_is_caught_by_the_loaders(victim, how, words, base_run,
                                                                     cli_env, tmp_path):
    """Even when the manifest was rewritten to match, a bad file is one line, not a traceback."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    _damage(run / "epoch-0001" / victim, how)
    _rehash(run / "epoch-0001")
    cmds = ("resume",) if victim == ck.STATES else ("resume", "evaluate")   # evaluate needs no .states
    for line in _refused(run, str(run / "epoch-0001" / victim), commands=cmds):
        assert words in line, line


def test_params_without_states(base_run, cli_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "epoch-0001" / ck.STATES).unlink()
    _refused(run, str(run / "epoch-0001" / ck.STATES), "missing")


def test_states_from_another_epoch(two_epoch_run, cli_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    shutil.copy(run / "epoch-0001" / ck.STATES, run / "epoch-0002" / ck.STATES)
    # Against the manifest it is corruption: the previous complete checkpoint is taken instead.
    assert ck.select_checkpoint(run).name == "epoch-0001"
    # With a manifest that agrees, the update count in the file gives it away.
    _rehash(run / "epoch-0002")
    _refused(run, str(run / "epoch-0002" / ck.STATES), "another checkpoint", commands=("resume",))


def test_params_from_another_epoch_is_corruption(two_epoch_run, cli_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    shutil.copy(run / "epoch-0001" / ck.PARAMS, run / "epoch-0002" / ck.PARAMS)
    with pytest.raises(ck.CheckpointError, match="SHA-256 differs"):
        ck.verify(ck.Checkpoint(run / "epoch-0002", 2, 0))
    r = _invoke("evaluate", run, "--which", "last", "--json")
    assert r.exit_code == 0 and json.loads(r.output.splitlines()[-1])["epoch"] == 1


@pytest.mark.parametrize("where", ["meta", "manifest"])
def test_newer_format_version_is_refused_not_skipped(where, two_epoch_run, cli_env, tmp_path):
    """Only the newest checkpoint is from a newer vgg-gluon: refuse, do not silently fall back."""
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    d = run / "epoch-0002"
    meta = json.loads((d / ck.META).read_text())
    meta["format_version"] = ck.FORMAT_VERSION + 1
    (d / ck.META).write_text(json.dumps(meta))
    _rehash(d, ck.FORMAT_VERSION + (1 if where == "manifest" else 0))
    _refused(run, str(d), "newer vgg-gluon", "upgrade")


@pytest.mark.slow
def test_corrupt_last_checkpoint_resume_takes_previous_and_says_so(two_epoch_run, tiny_data_dir, tmp_path):
    """The warning must reach the user's terminal without -v, and the bad copy must be kept."""
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    _damage(run / "epoch-0002" / ck.PARAMS, "flip")
    bad = (run / "epoch-0002" / ck.PARAMS).read_bytes()
    r = _run(["resume", run, "--epochs", 2], _env(tiny_data_dir))
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "previous complete checkpoint epoch-0001" in ln]
    assert len(warn) == 1 and str(run / "epoch-0002" / ck.PARAMS) in warn[0] and "corrupted" in warn[0], r.stderr
    assert _resumed_from(run) == "epoch-0001"
    ck.verify(ck.select_checkpoint(run))
    kept = [p for p in run.glob("epoch-0002.replaced-*")]
    assert len(kept) == 1 and (kept[0] / ck.PARAMS).read_bytes() == bad


# Bare .params given with --params: truncated, flipped, or for another network.
@pytest.fixture(scope="module")
def other_params(tmp_path_factory):
    import mxnet as mx

    from vgg_gluon import models
    out = tmp_path_factory.mktemp("params")
    made = {}
    for name, arch, classes, width in (("vgg13", "vgg13", 10, 0.0625), ("classes100", "vgg11", 100, 0.0625),
                                       ("wide", "vgg11", 10, 0.125)):
        net = models.build_vgg(arch, classes, width=width, batch_norm=True, fc_units=32)
        models.initialize(net, [mx.cpu()], seed=0)
        net(mx.nd.zeros((1, 1, 32, 32)))
        net.save_parameters(str(out / f"{name}.params"))
        made[name] = out / f"{name}.params"
    return made


def _refused_params(params: Path, out_dir: Path, extra=(), *words):
    before, outs = params.read_bytes(), sorted(out_dir.iterdir())
    lines = []
    for args in (["evaluate", "--params", params, "--dataset", "fashion-mnist", *extra],
                 ["resume", "--params", params, "--dataset", "fashion-mnist", *TINY, "--epochs", 1,
                  "--output-dir", out_dir, *extra]):
        lines.append(_one_line_error(_invoke(*args), str(params), *words))
    assert params.read_bytes() == before and sorted(out_dir.iterdir()) == outs
    return lines


@pytest.mark.parametrize("how", ["empty", "few-bytes", "half", "all-but-one", "flip-header"])
def test_damaged_bare_params(how, base_run, cli_env, tmp_path):
    p = tmp_path / "model.params"
    shutil.copy(base_run / "epoch-0001" / ck.PARAMS, p)
    _damage(p, how)
    (tmp_path / "out").mkdir()
    _refused_params(p, tmp_path / "out")


@pytest.mark.parametrize("name, extra", [
    ("own", ["--arch", "vgg16"]),          # architecture given that the file does not hold
    ("own", ["--width", "0.25"]),          # width given that the file does not hold
    ("own", ["--no-batch-norm"]),
    ("vgg13", ["--arch", "vgg11"]),        # another architecture than the one typed (without it: read)
    ("classes100", []),                    # 100 classes, the data set has 10
    ("wide", ["--width", "0.0625"]),
])
def test_bare_params_of_another_network(name, extra, other_params, base_run, cli_env, tmp_path):
    p = base_run / "epoch-0001" / ck.PARAMS if name == "own" else other_params[name]
    (tmp_path / "out").mkdir()
    _refused_params(p, tmp_path / "out", extra)


# ------------------------------------------------------------------------------------------------
# 5. bad command-line input not covered in test_cli: data folders, output folders, disk full
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somewhere")


def _mx_write_incomplete(self, filename, *a, **k):
    """What MXNet really raises when the disk fills up under Block.save_parameters (seen with
    /dev/full): an MXNetError whose text starts with a C++ traceback."""
    import mxnet as mx
    Path(filename).write_bytes(b"\x12\x01\0\0")  # it leaves a stub behind, too
    raise mx.base.MXNetError('Traceback (most recent call last):\n  File "../3rdparty/dmlc-core/src/io/'
                             'local_filesys.cc", line 38\nMXNetError: Check failed: std: :fwrite(ptr, 1, '
                             'size, fp_) == size: FileStream.Write incomplete')


def _truncating_save(self, filename, *a, **k):
    """A final flush that failed silently: the file is short, and nothing was raised."""
    _REAL_SAVE(self, filename, *a, **k)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) - 1000])


_REAL_SAVE = None


def _patch_disk_full(monkeypatch, where):
    global _REAL_SAVE
    import shutil as _sh

    from mxnet import gluon

    from vgg_gluon import report as report_mod
    if where.startswith("weights (MXNet"):
        monkeypatch.setattr(gluon.Block, "save_parameters", _mx_write_incomplete)
        monkeypatch.setattr(_sh, "disk_usage", lambda p: _sh._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    elif where.startswith("weights (silently"):
        _REAL_SAVE = gluon.Block.save_parameters
        monkeypatch.setattr(gluon.Block, "save_parameters", _truncating_save)
        monkeypatch.setattr(_sh, "disk_usage", lambda p: _sh._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    elif where == "optimizer state":
        monkeypatch.setattr(gluon.Trainer, "save_states", _enospc)
    elif where == "meta.json":
        monkeypatch.setattr(ck, "_write_fsync", _enospc)
    elif where == "pointer":
        monkeypatch.setattr(ck, "atomic_write_text", _enospc)
    else:
        monkeypatch.setattr(report_mod, "atomic_write_text", _enospc)


@pytest.mark.parametrize("where", ["weights (MXNet write error)", "weights (silently truncated)",
                                   "optimizer state", "meta.json", "pointer", "history.csv"])
def test_disk_full_during_a_save(where, base_run, cli_env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    first = _tree_hash(run / "epoch-0001")
    with monkeypatch.context() as m:
        _patch_disk_full(m, where)
        r = _invoke("resume", run, "--epochs", 2, "--quiet")
    line = _one_line_error(r, "disk full")
    assert "previous checkpoint is intact" in line
    assert _tree_hash(run / "epoch-0001") == first
    assert _temps(run) == []
    c = ck.select_checkpoint(run)
    ck.verify(c)
    # Until the pointer moved, the previous checkpoint is the one resume takes.
    assert c.name == ("epoch-0002" if where == "history.csv" else "epoch-0001")
    r = _invoke("resume", run, "--epochs", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in report.read_history(run / "history.csv")] == [1, 2]


def test_output_dir_under_a_file(cli_env, tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_line_error(_invoke("train", *TINY, "--epochs", 1, "--output-dir", tmp_path / "file" / "runs"),
                           "cannot create the run folder", "--output-dir")
    assert "Not a directory" in line


def test_output_dir_permission_denied(cli_env, tmp_path, monkeypatch):
    """Tests run as root, who may write anywhere: the refusal is simulated where mkdir fails."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if "denied" in str(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    _one_line_error(_invoke("train", *TINY, "--epochs", 1, "--output-dir", tmp_path / "denied"),
                    "cannot create the run folder", "Permission denied", "--output-dir")


@pytest.fixture
def offline_fashion(monkeypatch):
    from vgg_gluon import data
    monkeypatch.setattr(data.base, "SYSTEM_FASHION_MNIST_DIR", Path("/nonexistent/fashion-mnist"))
    monkeypatch.setattr(data.base, "FASHION_MNIST_URL", "http://127.0.0.1:9/")   # refused at once


def test_data_folder_missing(offline_fashion, tmp_path):
    # A folder that does not exist: refused as bad usage before anything else happens.
    r = _invoke("train", *TINY, "--epochs", 1, "--data-dir", tmp_path / "nope", "--output-dir", tmp_path)
    one_line_error(r, EXIT_USAGE, "'--data-dir'", "no such folder")
    # An empty one, offline: the download is tried and fails in one line.
    (tmp_path / "empty").mkdir()
    line = _one_line_error(_invoke("train", *TINY, "--epochs", 1, "--data-dir", tmp_path / "empty",
                                   "--output-dir", tmp_path))
    assert "cannot download" in line and "network" in line


def _copy_fashion(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "fashion-mnist", dst / "fashion-mnist")
    return dst / "fashion-mnist"


@pytest.mark.parametrize("damage, victim, words", [
    ("garbage", "train-images-idx3-ubyte.gz", ["is corrupted", "delete it and run again"]),
    ("half", "train-images-idx3-ubyte.gz", ["is corrupted", "delete it and run again"]),
    ("all-but-one", "t10k-labels-idx1-ubyte.gz", ["is corrupted", "delete it and run again"]),
    ("swap", "train-labels-idx1-ubyte.gz", ["not an idx file", "delete it and run again"]),
    ("bad-label", "t10k-labels-idx1-ubyte.gz", ["label 200", "delete it and run again"]),
    ("few-labels", "train-labels-idx1-ubyte.gz", ["256 images", "labels"]),
])
def test_data_folder_with_wrong_files(damage, victim, words, offline_fashion, tiny_data_dir, tmp_path):
    import gzip
    folder = _copy_fashion(tiny_data_dir, tmp_path / "data")
    f = folder / victim
    if damage == "garbage":
        f.write_bytes(os.urandom(300))
    elif damage in ("half", "all-but-one"):
        _damage(f, damage)
    elif damage == "swap":
        shutil.copy(folder / "train-images-idx3-ubyte.gz", f)
    elif damage == "bad-label":
        raw = bytearray(gzip.decompress(f.read_bytes()))
        raw[-1] = 200
        f.write_bytes(gzip.compress(bytes(raw)))
    elif damage == "few-labels":
        raw = gzip.decompress(f.read_bytes())
        f.write_bytes(gzip.compress(raw[:4] + (100).to_bytes(4, "big") + raw[8:108]))
    line = _one_line_error(_invoke("train", *TINY, "--epochs", 1, "--data-dir", tmp_path / "data",
                                   "--output-dir", tmp_path / "out"), *words)
    assert str(folder) in line
    assert not (tmp_path / "out").exists()


def test_cifar_folder_with_wrong_files(tmp_path):
    d = tmp_path / "data" / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for n in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (d / n).write_bytes(b"\0" * 3073 * 2)
    (d / "data_batch_3.bin").write_bytes(b"\0" * 5000)       # not a whole number of records
    _one_line_error(_invoke("train", *TINY, "--dataset", "cifar10", "--epochs", 1, "--data-dir", tmp_path / "data",
                            "--output-dir", tmp_path / "out"), str(d / "data_batch_3.bin"), "corrupted")
    (d / "data_batch_3.bin").unlink()
    _one_line_error(_invoke("train", *TINY, "--dataset", "cifar10", "--epochs", 1, "--data-dir", tmp_path / "data",
                            "--output-dir", tmp_path / "out"), "data_batch_3.bin", "delete it and run again")


def test_cifar_image_folder_with_a_broken_image(tmp_path):
    import numpy as np
    from PIL import Image
    root = tmp_path / "data" / "cifar10"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    _one_line_error(_invoke("train", *TINY, "--batch-size", 2, "--dataset", "cifar10", "--epochs", 1,
                            "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out"),
                    str(root / "train" / "dog" / "1.png"), "delete or replace it")


# ------------------------------------------------------------------------------------------------
# 6. GPU runtime failures: the messages, and that they are mapped when they happen mid-training
GPU_FAILURES = [
    ("libcuda.so.1: cannot open shared object file: No such file or directory", "NVIDIA driver"),
    ('Traceback (most recent call last):\n  File "../src/operator/nn/./cudnn/cudnn_convolution-inl.h", '
     "line 77\nMXNetError: Check failed: e == cudaSuccess (209 vs. 0) : CUDA: no kernel image is available "
     "for execution on the device", "Hopper"),
    ('Traceback (most recent call last):\n  File "../src/storage/./pooled_storage_manager.h", line 161\n'
     "MXNetError: cudaMalloc retry failed: out of memory", "smaller --batch-size"),
    ("Failed to allocate CPU Memory", "smaller --batch-size"),
    ("[17:02:11] ../src/imperative/./imperative_utils.h:93: GPU support is disabled. Compile MXNet with "
     "USE_CUDA=1 to enable GPU support.", "mxnet-cu112"),
    ('Traceback (most recent call last):\n  File "../src/imperative/imperative.cc", line 81\n'
     "MXNetError: Operator _zeros is not implemented for GPU.", "mxnet-cu112"),
    ("CUDA: CUDA driver version is insufficient for CUDA runtime version", "update the driver"),
]


@pytest.mark.parametrize("text, words", GPU_FAILURES)
def test_gpu_failure_messages(text, words):
    import mxnet as mx

    from vgg_gluon.runtime import explain_mxnet_error
    advice = explain_mxnet_error(mx.base.MXNetError(text))
    assert advice and words in advice and "\n" not in advice
    assert explain_mxnet_error(MemoryError()) and "batch-size" in explain_mxnet_error(MemoryError())


def test_real_gpu_op_on_cpu_build_is_explained():
    """The one of these failures this machine can produce for real."""
    import mxnet as mx

    from vgg_gluon.runtime import explain_mxnet_error
    if mx.runtime.Features().is_enabled("CUDA"):
        pytest.skip("a CUDA build")
    with pytest.raises(mx.base.MXNetError) as e:
        mx.nd.zeros((1,), ctx=mx.gpu(0)).asnumpy()
    assert "mxnet-cu112" in explain_mxnet_error(e.value)


@pytest.mark.parametrize("text, words", GPU_FAILURES[1:3])
def test_gpu_failure_during_training_is_one_line(text, words, base_run, cli_env, tmp_path, monkeypatch):
    import mxnet as mx

    from vgg_gluon import engine
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _tree_hash(run)

    def boom(*a, **k):
        raise mx.base.MXNetError(text)
    monkeypatch.setattr(engine, "train_one_epoch", boom)
    _one_line_error(_invoke("resume", run, "--epochs", 2, "--quiet"), words)
    monkeypatch.setattr(engine, "evaluate", boom)
    _one_line_error(_invoke("evaluate", run), words)
    assert ck.select_checkpoint(run).name == "epoch-0001"
    assert {k: v for k, v in _tree_hash(run).items() if k != "train.log" and not k.startswith("config")} == \
        {k: v for k, v in before.items() if k != "train.log" and not k.startswith("config")}


def test_unknown_mxnet_error_is_one_line_without_cpp_frames(base_run, cli_env, tmp_path, monkeypatch):
    import mxnet as mx

    from vgg_gluon import engine
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: (_ for _ in ()).throw(mx.base.MXNetError(
        'Traceback (most recent call last):\n  File "../src/x.cc", line 1\nMXNetError: something odd')))
    line = _one_line_error(_invoke("evaluate", base_run), "something odd", "VGG_GLUON_DEBUG")
    assert "Traceback" not in line
