"""`vgg-gluon launch`: one scheduler, S servers and N workers of MXNet's parameter server (ps-lite),
each started with the `DMLC_*` environment, as local subprocesses or over ssh on the hosts of a
host file. MXNet's own tools/launch.py needs the separate dmlc-tracker package; this is the
small part of it we need, plus the supervision it lacks:

- every child runs in its own process group (and, on Linux, dies with the launcher);
- Ctrl-C / SIGTERM are forwarded to the workers, which agree on a step, let rank 0 save a
  checkpoint and exit 130/143; the servers and scheduler are then stopped;
- if any process fails (non-zero exit, killed), the others get SIGTERM, then SIGKILL after
  `--grace` seconds, and the launcher exits non-zero: a dead peer would otherwise leave the
  survivors blocked forever in a synchronous push/pull;
- a second Ctrl-C, or workers still running `--stop-timeout` seconds after a forwarded signal,
  kills everything.

This module does not import mxnet: the launcher itself takes no part in training.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import click

LOCALHOST = "127.0.0.1"
SERVER_ARGV = ("-c", "import mxnet")   # importing mxnet with DMLC_ROLE=server|scheduler runs that role
ROLES = ("scheduler", "server", "worker")


class LaunchError(Exception):
    """A one-line, user-facing problem with the launch."""


@dataclass
class Node:
    role: str                      # scheduler | server | worker
    index: int                     # 0.. within its role (ps-lite assigns the worker *rank* itself)
    host: Optional[str]            # None: a local subprocess
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)   # added to the inherited environment

    @property
    def label(self) -> str:
        return self.role if self.role == "scheduler" else f"{self.role} {self.index}"


def read_hostfile(path: Path) -> List[str]:
    """One host per line (`host` or `user@host`); blank lines and `#` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LaunchError(f"{path}: cannot read ({exc.strerror})") from None
    hosts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line.split()) != 1:
            raise LaunchError(f"{path}:{n}: expected one host per line, got '{line}'")
        hosts.append(line)
    if not hosts:
        raise LaunchError(f"{path}: no hosts in the host file")
    return hosts


def _address(host: str) -> str:
    return host.rsplit("@", 1)[-1]


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_command(command: Sequence[str]) -> List[str]:
    """The vgg-gluon command every worker runs; `train` defaults to --kvstore dist_sync."""
    command = list(command)
    if not command or command[0] not in ("train", "resume"):
        raise LaunchError("give the command the workers run after `--`: "
                          "vgg-gluon launch -n 2 -- train [OPTIONS] (or -- resume RUN)")
    kv = None
    for i, arg in enumerate(command):
        if arg == "--kvstore" and i + 1 < len(command):
            kv = command[i + 1]
        elif arg.startswith("--kvstore="):
            kv = arg.split("=", 1)[1]
    if kv is not None and not kv.lower().startswith("dist"):
        raise LaunchError(f"--kvstore {kv} is for one process: launched workers need dist_sync, "
                          "dist_device_sync or dist_async")
    if kv is None and command[0] == "train":
        command += ["--kvstore", "dist_sync"]
    return command


def plan(num_workers: int, num_servers: int, command: Sequence[str], *, port: int,
         hosts: Optional[Sequence[str]] = None, python: str = sys.executable,
         launch_id: Optional[str] = None, threads: Optional[int] = None) -> List[Node]:
    """Scheduler, servers and workers with their DMLC_* environment.

    Locally everything binds to 127.0.0.1 (DMLC_NODE_HOST), never another interface. With hosts,
    the scheduler runs on the first host and servers and workers are dealt round-robin.
    """
    if num_workers < 1 or num_servers < 1:
        raise LaunchError("need at least one worker and one server")
    wcmd = worker_command(command)
    root = _address(hosts[0]) if hosts else LOCALHOST
    common = {"DMLC_PS_ROOT_URI": root, "DMLC_PS_ROOT_PORT": str(port),
              "DMLC_NUM_SERVER": str(num_servers), "DMLC_NUM_WORKER": str(num_workers),
              "VGG_GLUON_LAUNCH_ID": launch_id or time.strftime("%Y%m%d-%H%M%S")}
    nodes = []

    def add(role: str, index: int, host: Optional[str], argv: List[str]) -> None:
        env = dict(common, DMLC_ROLE=role, DMLC_NODE_HOST=_address(host) if host else LOCALHOST)
        if role == "worker" and threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        nodes.append(Node(role, index, host, argv, env))

    pick = (lambda i: hosts[i % len(hosts)]) if hosts else (lambda i: None)
    add("scheduler", 0, hosts[0] if hosts else None, [python, *SERVER_ARGV])
    for i in range(num_servers):
        add("server", i, pick(i), [python, *SERVER_ARGV])
    for i in range(num_workers):
        add("worker", i, pick(i), [python, "-m", "vgg_gluon", *wcmd])
    return nodes


def ssh_argv(node: Node, cwd: str, ssh: str = "ssh") -> List[str]:
    """The ssh command that starts `node` on its host, in the same folder (a shared filesystem).

    `-tt` gives the remote command a terminal, so it gets SIGHUP when the connection drops (the
    launcher killing its local ssh then ends the remote process too); `exec` leaves no shell.
    """
    assert node.host is not None
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(node.env.items()))
    remote = f"cd {shlex.quote(cwd)} && exec env {exports} " + " ".join(shlex.quote(a) for a in node.argv)
    return [ssh, "-o", "BatchMode=yes", "-tt", node.host, remote]


def _die_with_parent() -> None:
    """In the child before exec: own process group, and SIGKILL if the launcher dies (Linux)."""
    os.setsid()
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


class Launcher:
    """Starts the nodes, watches them, forwards signals, and cleans up."""

    def __init__(self, nodes: List[Node], *, cwd: Optional[str] = None, grace: float = 10.0,
                 stop_timeout: float = 300.0, ssh: str = "ssh", echo=None, poll: float = 0.1):
        self.nodes = nodes
        self.cwd = cwd or os.getcwd()
        self.grace, self.stop_timeout, self.ssh, self.poll = grace, stop_timeout, ssh, poll
        self.echo = echo or (lambda msg: click.echo(f"launch: {msg}", err=True))
        self.procs: List = []
        self.signals: List[int] = []

    # -- processes ------------------------------------------------------------------------------
    def start(self) -> None:
        import subprocess
        for node in self.nodes:
            argv = node.argv if node.host is None else ssh_argv(node, self.cwd, self.ssh)
            env = dict(os.environ, **node.env) if node.host is None else dict(os.environ)
            try:
                p = subprocess.Popen(argv, env=env, cwd=self.cwd, preexec_fn=_die_with_parent,
                                     stdin=subprocess.DEVNULL)
            except OSError as exc:
                self.kill_all(signal.SIGKILL)
                raise LaunchError(f"cannot start the {node.label}: {exc.strerror or exc}") from None
            self.procs.append(p)
            where = node.host or LOCALHOST
            self.echo(f"{node.label} pid {p.pid} on {where}")

    def _signal_group(self, p, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)   # the child is its group's leader (setsid)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_all(self, sig: int, roles: Sequence[str] = ROLES) -> None:
        for node, p in zip(self.nodes, self.procs):
            if node.role in roles:
                self._signal_group(p, sig)

    def _alive(self, roles: Sequence[str] = ROLES) -> List:
        return [p for n, p in zip(self.nodes, self.procs) if n.role in roles and p.poll() is None]

    def _wait(self, roles: Sequence[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._alive(roles):
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll)
        return True

    def shutdown(self, roles: Sequence[str] = ROLES) -> None:
        """SIGTERM, then SIGKILL after the grace period; reap everything; kill stray group members."""
        self.kill_all(signal.SIGTERM, roles)
        if not self._wait(roles, self.grace):
            self.kill_all(signal.SIGKILL, roles)
            self._wait(roles, 10.0)
        # Anything a child left behind in its process group goes too.
        self.kill_all(signal.SIGKILL, roles)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except Exception:
                pass

    # -- supervision ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.echo(f"{name}: asking the workers to save and stop (again to kill everything)")
            self.kill_all(signum, ("worker",))
        else:
            self.echo("second signal: killing every process")
            self.kill_all(signal.SIGKILL)

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.start()
            return self._supervise()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.procs:
                self.shutdown()

    def _supervise(self) -> int:
        stop_deadline, early_since = None, None
        while True:
            time.sleep(self.poll)
            if self.signals and stop_deadline is None:
                stop_deadline = time.monotonic() + self.stop_timeout
            if len(self.signals) > 1:
                return 128 + self.signals[0]
            workers = [(n, p) for n, p in zip(self.nodes, self.procs) if n.role == "worker"]
            codes = [p.poll() for _, p in workers]
            if self.signals:
                # Stopping: workers save and exit 130/143 (or 0 if they were finishing anyway).
                if all(c is not None for c in codes):
                    self.shutdown(("scheduler", "server"))
                    bad = [_exit_code(c) for c in codes if c]
                    return bad[0] if bad else 128 + self.signals[0]
                if time.monotonic() > stop_deadline:
                    self.echo(f"workers still running {self.stop_timeout:g}s after the signal: killing them")
                    return 128 + self.signals[0]
                continue
            for node, p in zip(self.nodes, self.procs):
                rc = p.poll()
                failed = rc is not None and rc != 0
                # A server or the scheduler ending cleanly while workers still run is normal for a
                # moment at the end (rank 0 stops them); for longer than the grace period it is not.
                early = False
                if rc == 0 and node.role != "worker" and any(c is None for c in codes):
                    early_since = early_since or time.monotonic()
                    early = time.monotonic() - early_since > self.grace
                if failed or early:
                    how = f"exited with code {rc}" if rc >= 0 else f"was killed by {signal.Signals(-rc).name}"
                    self.echo(f"{node.label} (pid {p.pid}) {how}: stopping the others")
                    self.shutdown()
                    return _exit_code(rc) if rc else 1
            if all(c == 0 for c in codes):
                # Rank 0 tells the servers to stop as it exits; give them the grace period.
                if not self._wait(("scheduler", "server"), self.grace):
                    self.echo("servers did not stop by themselves: terminating them")
                self.shutdown(("scheduler", "server"))
                return 0


# ------------------------------------------------------------------------------------------------
@click.command("launch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-n", "--num-workers", type=click.IntRange(min=1), required=True, help="Worker processes.")
@click.option("-s", "--num-servers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parameter-server processes (they hold and sum the gradients).")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False),
              help="Hosts (one a line) to start the processes on over ssh; the scheduler runs on the first. "
                   "Default: all local, on 127.0.0.1.")
@click.option("--port", type=click.IntRange(1024, 65535),
              help="Scheduler port (default: a free one locally; 9091 with --hostfile).")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when a process failed.")
@click.option("--stop-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds the workers get to save after Ctrl-C/SIGTERM before they are killed.")
@click.option("--dry-run", is_flag=True, help="Print each process's command and DMLC_* environment, start nothing.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def launch_cmd(num_workers, num_servers, hostfile, port, grace, stop_timeout, dry_run, command):
    """Train on several processes or machines with MXNet's parameter server (KVStore dist_*).

    Starts a scheduler, the servers and the workers with the DMLC_* environment; every worker runs
    the vgg-gluon command given after `--` (train defaults to --kvstore dist_sync). --batch-size
    stays the global batch; rank 0 writes the run folder. Exits non-zero if any process fails.

    \b
    Examples:
      vgg-gluon launch -n 2 -- train --dataset fashion-mnist --epochs 2 --name dist2
      vgg-gluon launch -n 4 -s 2 -- train --config experiments/cifar10.yaml --kvstore dist_device_sync
      vgg-gluon launch -n 2 -- resume checkpoints/dist2 --epochs 4
      vgg-gluon launch -n 8 -s 2 --hostfile hosts.txt -- train --ctx gpu:0,1 --output-dir /shared/runs
    """
    try:
        hosts = read_hostfile(Path(hostfile)) if hostfile else None
        if port is None:
            port = 9091 if hosts else free_port()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Local workers share this machine's cores (MXNet would give each of them all of them).
        threads = None if hosts else max(1, cores // num_workers)
        if os.environ.get("VGG_GLUON_THREADS"):   # the user's own choice (our _env set OMP_*)
            threads = int(os.environ["VGG_GLUON_THREADS"])
        nodes = plan(num_workers, num_servers, command, port=port, hosts=hosts, threads=threads)
    except LaunchError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        cwd = os.getcwd()
        for node in nodes:
            if node.host:
                click.echo(shlex.join(ssh_argv(node, cwd)))
            else:
                env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(node.env.items()))
                click.echo(f"{env} {shlex.join(node.argv)}")
        return
    launcher = Launcher(nodes, grace=grace, stop_timeout=stop_timeout)
    try:
        code = launcher.run()
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    if code:
        launcher.echo(f"exit {code}")
    sys.exit(code)
