"""``pfl deploy local`` and ``pfl deploy status``: a real deployment on this machine.

Every part is the process a real deployment runs, with the same flags, started from one run
config (``DIR/run.toml``) that both the pool and ``flwr run`` read, so that they agree on the
model:

- ``DIR/certs``: a dev CA, the server certificate, the federation key (``pfl certs``);
- the piece pool (``pfl pool serve --run-config DIR/run.toml``), TLS;
- a SuperLink with TLS and SuperNode authentication, running the ServerApp on this
  environment's locked packages (``--disable-runtime-dependency-installation``);
- N devices, each a ``flower-supernode`` with its own folder ``DIR/devices/device-I``: its
  authentication key (``pfl node-key``, registered with ``flwr supernode register``), its
  consent policy, its audit ledger, its state, its own port;
- the run (``flwr run``), whose log streams to the console and ``DIR/logs/flwr-run.log``.

Then it prints the results table, where the results, ledgers and logs are, and stops every
process it started (also on Ctrl-C or an error). ``DIR/deploy.json`` records the processes
and ports; ``pfl deploy status --dir DIR`` reads it and the run's ``status.json``.

:class:`LocalDeployment` is the same as a Python API (``tests/test_deployment.py`` uses it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edge_client.consent import ConsentPolicy
from shared.config import (RunConfig, parse_key_value, read_run_config_file,
                           run_config_toml)
from shared.crypto import write_dev_certs, write_federation_key, write_supernode_key
from shared.errors import PflError
from shared.files import write_json

#: The repository root: the Flower app (pyproject.toml's [tool.flwr.app]) that `flwr run` ships.
APP_DIR = Path(__file__).resolve().parents[1]
#: The connection name in ``DIR/flwr-home/config.toml`` (``flwr run APP deploy``).
CONNECTION = "deploy"
STATE_FILE = "deploy.json"
#: A consent policy that opts in to sharing PER-PCS pieces (the rest stays the default).
SHARING_CONSENT = """\
# This device opts in to sharing PER-PCS pieces when it is selected as a sharer (the
# default, edge_client/consent_default.toml, shares none). Every other setting keeps its
# default: see that file for each key.
version = 1

[upload]
perpcs_pieces = true
"""
#: Log lines of Flower's that say nothing about this run (deprecations of its own flags).
NOISE = ("DEPRECATED", "deprecated", "FutureWarning", "warnings.warn(")


def free_port() -> int:
    """A port nothing listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, log: Path,
                  timeout: float = 60.0) -> None:
    """Until something listens on ``port``; a one-line error naming the log when the
    process exits first or nothing listens after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PflError(f"{log.stem} exited (status {process.returncode}) before it "
                           f"listened on {port}: see {log}\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise PflError(f"{log.stem}: nothing listens on {port} after {timeout:.0f} s: see {log}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class LocalDeployment:
    """A deployment on this machine in ``directory``: certificates, pool, SuperLink, devices
    and the run, each a separate process; :meth:`stop` (or leaving the ``with`` block) ends
    every process it started, TERM then KILL, by process group.

    ``run_config``: run-config keys (dashed and dotted) over the defaults; ``num-clients``,
    ``run-dir``, ``pool-address`` and ``grant-key`` are set here. ``consent``: one policy
    file for every device; otherwise the first ``share`` devices opt in to sharing pieces
    (:data:`SHARING_CONSENT`) and the others keep the default policy (which shares none)."""

    directory: Path
    devices: int
    run_config: Mapping[str, Any] = field(default_factory=dict)
    consent: Path | None = None
    share: int | None = None
    say: Callable[[str], None] = print
    processes: list[Process] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.directory = Path(self.directory).expanduser().resolve()
        if self.devices < 1:
            raise PflError("--devices must be at least 1")
        if self.consent is not None:  # a bad policy is an error now, before any process
            if not Path(self.consent).is_file():
                raise PflError(f"no consent policy file {self.consent}")
            ConsentPolicy.load(self.consent)
        for tool in ("pfl", "flower-superlink", "flower-supernode", "flwr"):
            if not self.bin(tool).is_file():
                raise PflError(f"{tool} is not installed beside {sys.executable} "
                               "(run ./dev setup)")

    # ------------------------------------------------------------------ paths
    @staticmethod
    def bin(tool: str) -> Path:
        return Path(sys.executable).parent / tool

    @property
    def certs(self) -> Path:
        return self.directory / "certs"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    @property
    def run_toml(self) -> Path:
        return self.directory / "run.toml"

    def device_dir(self, index: int) -> Path:
        return self.directory / "devices" / f"device-{index}"

    def consent_policy(self, index: int) -> ConsentPolicy:
        """Device ``index``'s consent policy, as the device reads it (its file, else the
        built-in default)."""
        path = self.device_dir(index) / "consent.toml"
        return ConsentPolicy.load(path if path.is_file() else None)

    def env(self) -> dict[str, str]:
        """The processes' environment: this one, with Flower's home in the deployment, no
        hub access, and the warnings that say nothing about the run left out."""
        env = {**os.environ, "FLWR_HOME": str(self.directory / "flwr-home"),
               "PATH": f"{self.bin('pfl').parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
        env.setdefault("OMP_NUM_THREADS", "1")  # many processes on one machine
        return env

    # ------------------------------------------------------------------ steps
    def prepare(self) -> RunConfig:
        """Certificates, ports, the run config file, Flower's connection file, each device's
        folder, key and consent policy."""
        for sub in ("logs", "devices"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        # a new SuperLink and pool each time (the devices register again; no piece of an
        # earlier run is offered); the devices keep their keys and their ledgers, which
        # hold every run (pfl audit --run RUN_ID picks one)
        (self.directory / "superlink.db").unlink(missing_ok=True)
        shutil.rmtree(self.directory / "pool", ignore_errors=True)
        write_dev_certs(self.certs, ["localhost", "127.0.0.1"])
        grant_key, _ = write_federation_key(self.certs)
        self.ports = {"pool": free_port(), "superlink": free_port()}
        keys = {**dict(self.run_config), "num-clients": self.devices,
                "run-dir": str(self.run_dir),
                "pool-address": f"127.0.0.1:{self.ports['pool']}",
                "grant-key": str(grant_key)}
        self.run_toml.write_text(run_config_toml(keys))
        config = RunConfig.parse(read_run_config_file(self.run_toml))
        home = self.directory / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.ports["superlink"]}"\n'
            f'root-certificates = "{self.certs / "ca.pem"}"\n')
        sharing = self.devices if self.share is None else max(0, int(self.share))
        for index in range(self.devices):
            folder = self.device_dir(index)
            folder.mkdir(parents=True, exist_ok=True)
            write_supernode_key(folder / "supernode.key")
            policy = folder / "consent.toml"
            if self.consent is not None:
                shutil.copyfile(self.consent, policy)
            elif index < sharing:
                policy.write_text(SHARING_CONSENT)
            else:
                policy.unlink(missing_ok=True)  # the built-in default: no sharing
        return config

    def start(self, name: str, args: Sequence[str]) -> Process:
        """Start one process in its own group, its output in ``logs/NAME.log``."""
        log = self.logs / f"{name}.log"
        popen = subprocess.Popen([str(a) for a in args], stdout=log.open("wb"),
                                 stderr=subprocess.STDOUT, env=self.env(),
                                 start_new_session=True, cwd=self.directory)
        process = Process(name, popen, log)
        self.processes.append(process)
        self._save_state()
        return process

    def start_services(self) -> None:
        """The pool (its model from the run config) and the SuperLink, both with TLS."""
        pool = self.start("pool", [
            self.bin("pfl"), "pool", "serve", "--db", self.directory / "pool",
            "--port", self.ports["pool"], "--certs", self.certs,
            "--run-config", self.run_toml])
        wait_for_port(self.ports["pool"], pool.popen, pool.log)
        link = self.start("superlink", [
            self.bin("flower-superlink"), "--ssl-ca-certfile", self.certs / "ca.pem",
            "--ssl-certfile", self.certs / "server.pem",
            "--ssl-keyfile", self.certs / "server.key", "--host", "127.0.0.1",
            "--port", self.ports["superlink"], "--database", self.directory / "superlink.db",
            "--enable-supernode-auth", "--disable-runtime-dependency-installation"])
        wait_for_port(self.ports["superlink"], link.popen, link.log)
        self.say(f"pool on 127.0.0.1:{self.ports['pool']}, SuperLink on "
                 f"127.0.0.1:{self.ports['superlink']} (TLS, SuperNode authentication)")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """One ``flwr`` CLI command against the deployment's SuperLink."""
        return subprocess.run([str(self.bin("flwr")), *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.directory)

    def register(self, public_key: Path) -> None:
        """The operator's step: register a device's public key with the SuperLink."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if done.returncode != 0 or "registered" not in done.stdout:
            raise PflError(f"flwr supernode register {public_key.name} failed: "
                           f"{(done.stdout + done.stderr).strip()[-500:]}")

    def start_device(self, index: int, *, key: Path | None = None,
                     name: str | None = None) -> Process:
        """One SuperNode: its own folder, ledger, consent, key and port."""
        folder = self.device_dir(index)
        folder.mkdir(parents=True, exist_ok=True)
        policy = folder / "consent.toml"
        node_config = (f'partition-id={index} num-partitions={self.devices} '
                       f'ledger="{folder / "ledger.jsonl"}" state-dir="{folder}" '
                       f'pool-ca="{self.certs / "ca.pem"}"')
        if policy.is_file():
            node_config += f' consent-policy="{policy}"'
        port = free_port()
        self.ports[name or f"device-{index}"] = port
        return self.start(name or f"device-{index}", [
            self.bin("flower-supernode"), "--root-certificates", self.certs / "ca.pem",
            "--superlink", f"127.0.0.1:{self.ports['superlink']}", "--port", port,
            "--auth-supernode-private-key", key or folder / "supernode.key",
            "--node-config", node_config])

    def start_devices(self) -> None:
        for index in range(self.devices):
            self.register(self.device_dir(index) / "supernode.key.pub")
        for index in range(self.devices):
            self.start_device(index)
        sharing = [i for i in range(self.devices) if self.consent_policy(i).allows(
            "perpcs_pieces") is not None]
        self.say(f"{self.devices} devices registered and started (folders under "
                 f"{self.directory / 'devices'}); {len(sharing)} consent to share pieces")

    def run(self, timeout: float = 3600.0, echo: Callable[[str], None] | None = None
            ) -> dict[str, Any] | None:
        """``flwr run`` with the run config; its log goes to ``logs/flwr-run.log`` and, with
        ``echo``, line by line to it (Flower's deprecation notices left out). Returns the
        run's ``federation.json`` content, or None when the run wrote none."""
        summary_path = self.run_dir / "federation.json"
        summary_path.unlink(missing_ok=True)
        (self.run_dir / "status.json").unlink(missing_ok=True)
        log = self.logs / "flwr-run.log"
        popen = subprocess.Popen(
            [str(self.bin("flwr")), "run", str(APP_DIR), CONNECTION, "--stream",
             "--run-config", str(self.run_toml)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
            cwd=self.directory)
        self.processes.append(Process("flwr-run", popen, log))
        self._save_state()
        pump = threading.Thread(target=_pump, args=(popen, log, echo), daemon=True)
        pump.start()
        deadline = time.monotonic() + timeout
        finished_at = None
        while popen.poll() is None and time.monotonic() < deadline:
            if finished_at is None and _finished(self.run_dir):
                finished_at = time.monotonic()
            if finished_at is not None and time.monotonic() - finished_at > 30:
                break  # the run is over; the log stream did not end by itself
            time.sleep(0.5)
        if popen.poll() is None and time.monotonic() >= deadline:
            self.say(f"pfl deploy: the run did not finish in {timeout:.0f} s; stopping it")
        _stop(popen)
        pump.join(timeout=5)
        if not summary_path.is_file():
            return None
        return json.loads(summary_path.read_text())

    def stop(self) -> None:
        """Stop every process this deployment started (TERM, then KILL after 15 s)."""
        for process in reversed(self.processes):
            _signal(process.popen, signal.SIGTERM)
        for process in reversed(self.processes):
            _stop(process.popen)
        self._save_state()

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _save_state(self) -> None:
        write_json(self.directory / STATE_FILE, {
            "devices": self.devices, "ports": self.ports, "run_dir": str(self.run_dir),
            "run_config": str(self.run_toml), "flwr_home": str(self.directory / "flwr-home"),
            "processes": [{"name": p.name, "pid": p.popen.pid, "log": str(p.log),
                           "exit": p.popen.poll()} for p in self.processes]})


def _finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "status.json").read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def _pump(popen: subprocess.Popen, log: Path, echo: Callable[[str], None] | None) -> None:
    with log.open("w", encoding="utf-8") as out:
        for raw in popen.stdout:
            line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            out.write(line)
            out.flush()
            if echo is not None and not any(n in line for n in NOISE):
                echo(line.rstrip("\n"))


def _signal(popen: subprocess.Popen, sig: int) -> None:
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            pass


def _stop(popen: subprocess.Popen) -> None:
    _signal(popen, signal.SIGTERM)
    try:
        popen.wait(timeout=15)
    except subprocess.TimeoutExpired:
        _signal(popen, signal.SIGKILL)
        popen.wait(timeout=5)


# ------------------------------------------------------------------------------ commands
def deploy_run_config(args) -> dict[str, Any]:
    """The run config of ``pfl deploy local``: ``--run-config FILE``, then the flags, then
    ``--set KEY=VALUE`` (each checked as ``flwr run`` would)."""
    keys: dict[str, Any] = {"model": "smollm2-135m", "sharers": 1, "targets": 1}
    if args.run_config:
        keys.update(read_run_config_file(args.run_config))
    for key, value in (("model", args.model), ("methods", args.methods),
                       ("task", args.task), ("data-path", args.data)):
        if value is not None:
            keys[key] = str(Path(value).resolve()) if key == "data-path" else value
    keys.update(parse_key_value(text) for text in args.set or [])
    for fixed in ("num-clients", "run-dir", "pool-address", "grant-key"):
        if fixed in keys:
            raise PflError(f"pfl deploy local sets {fixed} itself; leave it out")
    RunConfig.parse(keys)  # one-line error now, not in the ServerApp
    return keys


def cmd_deploy_local(args) -> int:
    """Run a real deployment on this machine, every part its own process (pool, SuperLink,
    N SuperNodes, flwr run), with TLS and SuperNode authentication; print the results and
    where everything is; stop every process on exit or Ctrl-C."""
    from cloud_server.federation import format_results  # lazy: Flower loads with it

    started = time.perf_counter()
    deployment = LocalDeployment(Path(args.dir), args.devices, deploy_run_config(args),
                                 consent=Path(args.consent) if args.consent else None,
                                 share=args.share)
    print(f"pfl deploy: {args.devices} devices in {deployment.directory}", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with deployment:
            config = deployment.prepare()
            print(f"run config: {deployment.run_toml} (model {config.model}, methods "
                  f"{config.methods}); the pool reads the same file", flush=True)
            deployment.start_services()
            deployment.start_devices()
            print("flwr run: streaming the run's log "
                  f"(also in {deployment.logs / 'flwr-run.log'})", flush=True)
            summary = deployment.run(timeout=args.timeout,
                                     echo=None if args.quiet else _echo)
    finally:
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.perf_counter() - started
    print(f"\npfl deploy: every process stopped; {elapsed:.0f} s in all")
    if summary is None:
        print(f"pfl deploy: the run wrote no results; see the logs in {deployment.logs}",
              file=sys.stderr)
        return 1
    print("\n" + format_results(summary))
    print(f"\nresults: {deployment.run_dir / 'federation.json'}")
    print(f"ledgers: {deployment.directory / 'devices'}/device-*/ledger.jsonl  "
          f"(pfl audit summary {deployment.directory / 'devices'})")
    print(f"logs:    {deployment.logs}")
    print(f"serve:   pfl serve --run {deployment.run_dir} --certs {deployment.certs} "
          f"--pool-db {deployment.directory / 'pool'}")
    if not any("metrics" in row for row in summary["methods"].values()):
        print("pfl deploy: no method was evaluated", file=sys.stderr)
        return 1
    return 0


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _echo(line: str) -> None:
    if not sys.stdout.isatty():  # Flower's colours, for a terminal only
        line = _ANSI.sub("", line)
    print(f"  | {line}", flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_deploy_status(args) -> int:
    """Where a deployment stands: its processes, the SuperLink's nodes, the run's phase,
    progress and roles."""
    directory = Path(args.dir).expanduser().resolve()
    path = directory / STATE_FILE
    if not path.is_file():
        raise PflError(f"no deployment in {directory} (no {STATE_FILE}: start one with "
                       "pfl deploy local)")
    try:
        state = json.loads(path.read_text())
        processes = list(state["processes"])
    except (ValueError, KeyError, TypeError):
        raise PflError(f"{path} is damaged") from None
    print(f"deployment {directory}: {state.get('devices')} devices")
    for process in processes:
        alive = _alive(process.get("pid"))
        port = (state.get("ports") or {}).get(process.get("name"))
        print(f"  {str(process.get('name')):<12} pid {process.get('pid')!s:<8} "
              f"{'running' if alive else 'stopped'}"
              f"{f'  port {port}' if port else ''}")
    link = next((p for p in processes if p.get("name") == "superlink"), None)
    if link is not None and _alive(link.get("pid")):
        listing = subprocess.run(
            [str(LocalDeployment.bin("flwr")), "supernode", "list", CONNECTION, "--format",
             "json"], env={**os.environ, "FLWR_HOME": str(state.get("flwr_home"))},
            capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(listing.stdout[listing.stdout.index("{"):])["nodes"]
            print(f"SuperLink: {len(nodes)} registered node(s): " + ", ".join(
                f"{n.get('node-id', n.get('node_id'))} {n.get('status', '')}".strip()
                for n in nodes))
        except (ValueError, KeyError, TypeError):
            print("SuperLink: could not list its nodes")
    status_path = Path(str(state.get("run_dir"))) / "status.json"
    if not status_path.is_file():
        print("run: not started")
        return 0
    status = json.loads(status_path.read_text())
    line = f"run: {status.get('phase')}"
    if "total" in status and not status.get("finished"):
        line += f" ({status.get('done', 0)}/{status['total']} done, " \
                f"{status.get('failed', 0)} failed)"
    print(line + f"  [updated {status.get('updated')}]")
    counts = status.get("role_counts") or {}
    for role, nodes in (status.get("roles") or {}).items():
        more = int(counts.get(role, len(nodes))) - len(nodes)
        print(f"  {role}: {', '.join(str(n) for n in nodes) or '-'}"
              f"{f' ... and {more} more' if more > 0 else ''}")
    if status.get("finished"):
        print(f"results: {status.get('results')} (evaluated: "
              f"{', '.join(status.get('evaluated_methods') or []) or 'nothing'})")
    return 0


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def add_deploy_commands(subparsers) -> None:
    """Register ``pfl deploy local`` and ``pfl deploy status``."""
    deploy = subparsers.add_parser(
        "deploy", help="a real deployment (pool, SuperLink, SuperNodes) on this machine")
    commands = deploy.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND",
                                     required=True)
    local = commands.add_parser("local", help="start every part as its own process, run the "
                                "federation, print the results, stop everything",
                                description=cmd_deploy_local.__doc__)
    local.add_argument("--devices", type=int, default=3,
                       help="SuperNodes, one user each (default 3: a target, a sharer, "
                            "a collective device)")
    local.add_argument("--dir", default="runs/deploy",
                       help="the deployment's folder: certs, pool, devices, run, logs "
                            "(default %(default)s)")
    local.add_argument("--model", default=None,
                       help="base model (default smollm2-135m; tiny for a quick check)")
    local.add_argument("--methods", default=None, help="comma-separated methods (default: "
                       "the run config's, nonpersonalized,oppu,perpcs,perfit)")
    local.add_argument("--task", default=None, help="synthetic (default) or a real task")
    local.add_argument("--data", default=None, help="the data folder of a real task")
    local.add_argument("--run-config", default=None, metavar="FILE",
                       help="run-config keys (TOML), as flwr run --run-config takes them")
    local.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="one run-config key, e.g. max-history=8 or oppu.lr=0.001 "
                            "(repeatable)")
    local.add_argument("--consent", default=None, metavar="FILE",
                       help="every device's consent policy (default: see --share)")
    local.add_argument("--share", type=int, default=None, metavar="K",
                       help="without --consent: the first K devices opt in to sharing "
                            "PER-PCS pieces, the others keep the default policy, which "
                            "shares none (default: every device)")
    local.add_argument("--timeout", type=float, default=3600.0,
                       help="seconds the run may take (default %(default)s)")
    local.add_argument("--quiet", action="store_true", help="do not echo the run's log")
    local.set_defaults(func=cmd_deploy_local)
    status = commands.add_parser("status", help="processes, nodes and the run's phase",
                                 description=cmd_deploy_status.__doc__)
    status.add_argument("--dir", default="runs/deploy", help="the deployment's folder")
    status.set_defaults(func=cmd_deploy_status)
