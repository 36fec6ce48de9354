"""Simulate a federation on one machine: ServerApp + N virtual ClientApps.

:func:`run_federation_simulation` runs every phase (``pfl simulate``, ``pfl demo``);
:func:`run_stage1_simulation` runs collective stage 1 alone (``pfl simulate --phases
stage1``). Both run on one of two backends:

- ``backend="ray"`` (default): Flower's Simulation Runtime
  (:func:`flwr.simulation.run_simulation`): the ServerApp runs in a thread of this process,
  the ClientApps in Ray actor processes (``num_cpus`` per client), each loading the frozen base
  model once; the exact apps a real deployment runs.
- ``backend="inprocess"``: :class:`LocalGrid` delivers each message straight to the ClientApp
  in this process, one at a time: no Ray, deterministic, quick to start; same apps, same
  messages (metadata filled as a SuperLink would), same ledgers.

``run_simulation`` has no run-config argument in flwr 1.41, so the server's settings are
bound into the ServerApp (:func:`cloud_server.federation.make_federation_app`,
:func:`cloud_server.server_app.make_server_app`) and reach the clients inside every message's
ConfigRecord. :func:`run_on_engine` is the one way this project starts Flower's engine.
Per-client state and ledgers live under ``run_dir/clients/partition-NNNNN/``
(:mod:`edge_client.state`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid

from cloud_server.federation import (check_evaluated, make_federation_app, resolve,
                                     run_federation)
from cloud_server.pool_service import start_pool_server
from cloud_server.server_app import make_server_app, resolve_config, run_stage1
from edge_client.client_app import make_client_app
from edge_client.state import ledger_paths
from shared.crypto import write_dev_certs, write_federation_key
from shared.errors import PflError
from simulations.flower_patches import patch_simulation_engine

log = logging.getLogger("flwr.pfl.simulate")

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID
BACKENDS = ("ray", "inprocess")


class LocalGrid(Grid):
    """A Grid that runs a ClientApp in this process for each of ``num_nodes`` virtual nodes.

    Node ids are 1001..1000+N (1 is the SuperLink's), partition ids 0..N-1; each node keeps
    its own Context (as Flower's simulation does); ``node_config`` is added to every node's
    config, ``node_configs[pid]`` to partition ``pid``'s (e.g. a device's consent policy).
    A ClientApp that raises gives an error reply, as on a real SuperNode; a node in
    ``unreachable`` (partition ids) has vanished: it never replies. Like
    ``run_simulation``, it sets this process's Flower task identity (which ``Message(...)``
    reads) to the run.
    """

    FIRST_NODE_ID = 1001
    #: every message is delivered and answered inside ``push_messages``: a reply that is not
    #: there after it will never come (cloud_server.federation stops waiting at once)
    synchronous = True

    def __init__(self, client_app, num_nodes: int, *, run_id: int = 1,
                 node_config: dict[str, Any] | None = None,
                 node_configs: dict[int, dict[str, Any]] | None = None,
                 on_reply: Callable[[Message], None] | None = None,
                 unreachable: Iterable[int] = ()):
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        if num_nodes < 1:
            raise PflError(f"need at least one node, got {num_nodes}")
        self.client_app = client_app
        self._run = Run.create_empty(run_id=run_id)
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts = {
            self.FIRST_NODE_ID + pid: Context(
                run_id=run_id, node_id=self.FIRST_NODE_ID + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes,
                             **(node_config or {}), **(node_configs or {}).get(pid, {})},
                state=RecordDict(), run_config={})
            for pid in range(num_nodes)}
        self._replies: dict[str, Message] = {}
        self.on_reply = on_reply  # sees every reply as it leaves a device (tests, tracing)
        # partitions whose device has vanished: messages to them are lost, no reply comes
        self.unreachable = {self.FIRST_NODE_ID + int(pid) for pid in unreachable}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message, message_id: str) -> Message:
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

        meta = message.metadata
        # each device gets its own copy, as from the wire (a server may send one RecordDict
        # to many devices, and a device's mods may change what they received: SecAgg+ does)
        content = recorddict_from_proto(recorddict_to_proto(message.content))
        incoming = Message(content, metadata=Metadata(
            run_id=self._run.run_id, message_id=message_id, src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=meta.dst_node_id, reply_to_message_id="", group_id=meta.group_id,
            created_at=time.time(), ttl=meta.ttl, message_type=meta.message_type))
        try:
            reply = self.client_app(incoming, self.contexts[meta.dst_node_id])
        except Exception as exc:  # a crashing ClientApp: an error reply, like a SuperNode's
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"),
                            reply_to=incoming)
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:  # the key is the message id a reply answers, as Flower's
            key = uuid.uuid4().hex
            if message.metadata.dst_node_id not in self.unreachable:
                self._replies[key] = self._deliver(message, key)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(key) for key in message_ids if key in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def start_ray(attempts: int = 3, address: str | None = None) -> None:
    """Start Ray for Flower's simulation engine, retrying a failed start; with ``address``
    (``HOST:PORT`` of a running cluster's head, or ``auto``), join that cluster instead of
    starting a private one. Either way the workers get this process's ``sys.path``.

    Ray gives its raylet a fixed 30 s to register with the GCS; on a loaded machine a start
    now and then misses it ("The current node timed out during startup"). Flower would then
    crash the run with its ServerApp thread already started; starting Ray here first, before
    anything else runs, makes a retry safe (Flower reuses an initialized Ray, with the same
    settings it would use, and shuts it down at the end)."""
    import sys

    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            if address:  # an existing cluster: it has its own dashboard settings
                ray.init(address=address,
                         runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
            else:
                ray.init(include_dashboard=False,
                         runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
            return
        except Exception as exc:  # Ray raises plain Exception / RuntimeError here
            log.warning("Ray did not start (attempt %d of %d): %s", attempt, attempts, exc)
            try:
                ray.shutdown()
            except Exception:  # pragma: no cover - best effort
                pass
            if attempt == attempts:
                where = f"join the Ray cluster at {address}" if address else "start"
                raise PflError(f"Ray (Flower's simulation engine) did not {where} after "
                               f"{attempts} attempts: {exc}") from exc
            time.sleep(2.0)


def run_on_engine(server_app, client_app, num_clients: int, *,
                  num_cpus_per_client: float = 1.0, num_gpus_per_client: float = 0.0,
                  ray_address: str | None = None, verbose: bool = False) -> None:
    """Run a ServerApp with ``num_clients`` virtual ClientApps on Flower's simulation engine
    (Ray), as every Ray run of this project does: the engine's message loop patched for large
    populations (:mod:`simulations.flower_patches`; ``PFL_FLOWER_PATCH=0`` keeps Flower's),
    Ray started first with retries (:func:`start_ray`), and an engine crash turned into a
    :class:`PflError` that names its cause. ``ray_address``: join that running Ray cluster
    (``ray start --head``) instead of starting a private one; each virtual client then takes
    ``num_cpus_per_client`` CPUs and ``num_gpus_per_client`` GPUs (fractions let several
    clients share one GPU) wherever the cluster places it."""
    from flwr.simulation import run_simulation

    if os.environ.get("PFL_FLOWER_PATCH", "1") != "0":
        patch_simulation_engine()
    start_ray(address=ray_address)
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=int(num_clients),
                       backend_config={"client_resources": {
                           "num_cpus": num_cpus_per_client,
                           "num_gpus": num_gpus_per_client}},
                       verbose_logging=verbose)
    except RuntimeError as exc:  # Flower's "Simulation Runtime crashed" (e.g. Ray's start)
        cause = exc.__cause__.__cause__ if exc.__cause__ is not None else None
        raise PflError(f"Flower's simulation engine stopped: {exc}"
                       + (f" ({cause})" if cause else "") + "; see the log above") from exc


def _run_server(backend: str, main, make_app, config: dict[str, Any], num_clients: int,
                summary_path: Path, *, num_cpus_per_client: float, verbose: bool,
                device: dict[str, Any], grid_options: dict[str, Any] | None = None,
                num_gpus_per_client: float = 0.0, ray_address: str | None = None
                ) -> dict[str, Any]:
    """Run a server phase function ``main(grid, config)`` over ``num_clients`` virtual devices:
    in this process on a :class:`LocalGrid` (``grid_options`` go to it), or as the ServerApp
    ``make_app(config)`` on Flower's simulation engine, whose summary is read back from
    ``summary_path`` (``run_simulation`` returns nothing). ``device``: the virtual devices'
    own settings (``device-root``, ``consent-policy``, ``pool-ca``; see
    :func:`edge_client.client_app.device_settings_mod`), never sent by the server."""
    if backend == "inprocess":
        if ray_address:
            raise PflError("--ray-address needs the Ray backend (--backend ray)")
        return main(LocalGrid(make_client_app(device), int(num_clients),
                              **(grid_options or {})), config)
    run_on_engine(make_app(config), make_client_app(device), num_clients,
                  num_cpus_per_client=num_cpus_per_client,
                  num_gpus_per_client=num_gpus_per_client, ray_address=ray_address,
                  verbose=verbose)
    if not summary_path.is_file():
        raise PflError(f"the simulation ended without a summary in {summary_path.parent} "
                       "(see the log above)")
    return json.loads(summary_path.read_text())


def run_stage1_simulation(method: str = "lora", num_clients: int = 2, rounds: int = 2,
                          model: str = "tiny", run_dir: str | Path = "runs/stage1",
                          seed: int = 0, *, fraction_train: float = 1.0,
                          num_users_per_client: int = 2, backend: str = "ray",
                          num_cpus_per_client: float = 1.0, local_epochs: float | None = None,
                          max_steps: int | None = None, max_history: int | None = None,
                          options: dict[str, Any] | None = None,
                          num_gpus_per_client: float = 0.0, ray_address: str | None = None,
                          verbose: bool = False) -> dict[str, Any]:
    """Run stage 1 (FedAvg of the task LoRA or of PerFit stage 1) over ``num_clients`` virtual
    clients on synthetic users; return the server's summary plus the client ledgers.

    Returns a dict with ``rounds``, ``train_loss`` (per round), ``replies`` (per round),
    ``accepted``, ``history`` (per-round details), ``final_arrays`` (npz path),
    ``ledgers`` ({partition id: path}), ``backend`` and ``wall_seconds``. ``options`` adds
    run-config keys (see :mod:`cloud_server.server_app`), e.g. ``{"batch-size": 8}``.
    """

    if backend not in BACKENDS:
        raise PflError(f"unknown simulation backend {backend!r} (known: {', '.join(BACKENDS)})")
    run_dir = Path(run_dir).expanduser().resolve()
    config: dict[str, Any] = {
        "method": method, "rounds": int(rounds), "fraction-train": float(fraction_train),
        "model": model, "num-users-per-client": int(num_users_per_client), "seed": int(seed),
        "run-dir": str(run_dir), "num-clients": int(num_clients)}
    for key, value in (("local-epochs", local_epochs), ("max-steps", max_steps),
                       ("max-history", max_history)):
        if value is not None:
            config[key] = value
    config.update(options or {})
    resolve_config(config)  # fail early, before any runtime starts
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = _run_server(backend, run_stage1, make_server_app, config, num_clients,
                          summary_path, num_cpus_per_client=num_cpus_per_client,
                          num_gpus_per_client=num_gpus_per_client, ray_address=ray_address,
                          verbose=verbose, device={"device-root": str(run_dir)})
    summary["backend"] = backend
    summary["wall_seconds"] = time.perf_counter() - started
    summary["ledgers"] = {str(pid): str(path) for pid, path in ledger_paths(run_dir).items()}
    return summary


SIMULATION_CONSENT = Path(__file__).with_name("consent_simulation.toml")


def run_federation_simulation(num_clients: int = 6, *, methods: str = "nonpersonalized,oppu,perpcs,perfit",
                              targets: int = 2, sharers: int = 2, model: str = "tiny",
                              task: str = "synthetic", data_path: str | None = None,
                              run_dir: str | Path = "runs/federation", seed: int = 0,
                              rounds: int = 1, backend: str = "inprocess",
                              consent_policy: str | Path | None = None,
                              answer_backend: str = "torch",
                              options: dict[str, Any] | None = None,
                              num_cpus_per_client: float = 1.0,
                              num_gpus_per_client: float = 0.0,
                              ray_address: str | None = None,
                              node_configs: dict[int, dict[str, Any]] | None = None,
                              on_reply: Callable[[Message], None] | None = None,
                              unreachable: Iterable[int] = (),
                              verbose: bool = False) -> dict[str, Any]:
    """A whole federation (every phase of :mod:`cloud_server.federation`) on one machine.

    Starts the real piece-pool gRPC service with TLS on 127.0.0.1 (dev certificates under
    ``run_dir/certs``, the database under ``run_dir/pool``), runs the federation ServerApp
    with ``num_clients`` virtual devices (one user each) on ``backend``, stops the pool and
    returns the server's summary plus ``ledgers`` ({partition: path}). ``answer_backend``:
    how the devices answer their queries (a device setting, ``torch`` or ``onnx*``).
    ``node_configs``,
    ``on_reply`` and ``unreachable`` go to :class:`LocalGrid` (in-process backend only).
    """

    if backend not in BACKENDS:
        raise PflError(f"unknown simulation backend {backend!r} (known: {', '.join(BACKENDS)})")
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    certs = write_dev_certs(run_dir / "certs")
    grant_key, _ = write_federation_key(certs.directory)  # pool: grants only
    config: dict[str, Any] = {
        "methods": methods, "targets": int(targets), "sharers": int(sharers), "model": model,
        "task": task, "seed": int(seed), "rounds": int(rounds), "run-dir": str(run_dir),
        "num-clients": int(num_clients), "num-users-per-client": 1,
        "grant-key": str(grant_key)}
    device = {"device-root": str(run_dir), "pool-ca": str(certs.ca_cert),  # the devices' own
              "consent-policy": str(consent_policy or SIMULATION_CONSENT),
              "answer-backend": answer_backend}
    if data_path:
        config["data-path"] = str(data_path)
    config.update(options or {})
    resolve(config)  # fail early
    started = time.perf_counter()
    pool = start_pool_server(run_dir / "pool", certs.directory, model=model,
                             open_enrolment=False)
    try:
        config["pool-address"] = pool.target
        summary_path = run_dir / "federation.json"
        summary_path.unlink(missing_ok=True)
        summary = _run_server(backend, run_federation,
                              lambda cfg: make_federation_app(cfg, print_results=False), config,
                              num_clients, summary_path,
                              num_cpus_per_client=num_cpus_per_client,
                              num_gpus_per_client=num_gpus_per_client,
                              ray_address=ray_address, verbose=verbose,
                              device=device, grid_options={"node_configs": node_configs,
                                            "on_reply": on_reply,
                                            "unreachable": unreachable})
        summary["pool_pieces"] = len(pool.store)
    finally:
        pool.stop()
    summary["backend"] = backend
    summary["wall_seconds"] = time.perf_counter() - started
    summary["ledgers"] = {str(pid): str(path) for pid, path in ledger_paths(run_dir).items()}
    return dict(check_evaluated(summary))  # Flower's engine does not pass the failure on
