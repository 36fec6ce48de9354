"""``pfl certs`` and ``pfl pool ...``: registration functions for the pfl command.

    pfl certs DIR --hosts localhost,127.0.0.1      dev CA (reused if present) + server cert
    pfl pool serve --db DIR --port P --certs DIR [--run-config F]   the piece pool over TLS
    pfl pool check --db DIR                        re-hash every blob, verify signatures
    pfl serve --certs DIR [--run RUN_DIR] [--pool-db DIR]   the inference service over TLS

``simulations.cli`` calls :func:`add_certs_command`, :func:`add_pool_commands` and
:func:`add_serve_command` on its
subparsers; each handler takes the parsed args and returns an exit status.
"""

from __future__ import annotations

import argparse
from cloud_server.pool_service import serve
from cloud_server.pool_store import DB_NAME, PoolStore
from shared.config import RunConfig, read_run_config_file
from shared.crypto import write_dev_certs, write_federation_key
from shared.errors import PflError


def _hosts(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise argparse.ArgumentTypeError("give at least one host name or IP address")
    return hosts


def cmd_certs(args) -> int:
    """Create the dev CA (or reuse it) and a server certificate for the hosts."""
    certs = write_dev_certs(args.directory, args.hosts, new_ca=args.new_ca)
    private, public = write_federation_key(args.directory)
    print(f"CA certificate:     {certs.ca_cert}  (give this to clients)")
    print(f"server certificate: {certs.server_cert}  for {', '.join(args.hosts)}")
    print(f"federation key:     {private}  (the cloud server signs sharer grants with it: "
          "run config grant-key)")
    print(f"                    {public}  (the pool trusts it)")
    print(f"private keys:       {certs.ca_key}, {certs.server_key}, {private}  (mode 0600; "
          "keep secret)")
    return 0


def pool_model(model: str | None, run_config: str | None) -> str | None:
    """The model whose shapes the pool checks pieces against: the run config's ``model``
    (the same file ``flwr run --run-config`` reads, so the two cannot disagree), or
    ``--model``; both given and different is an error."""
    if run_config is None:
        return model
    configured = RunConfig.parse(read_run_config_file(run_config)).model
    if model is not None and model != configured:
        raise PflError(f"--model {model} but the run config {run_config} runs {configured}: "
                       "give one of them")
    return configured


def cmd_pool_serve(args) -> int:
    """Serve the piece pool until interrupted."""
    return serve(args.db, args.port, args.certs, args.host,
                 model=pool_model(args.model, args.run_config),
                 open_enrolment=args.open, max_update_norm=args.max_update_norm,
                 max_norm_ratio=args.max_norm_ratio)


def cmd_pool_check(args) -> int:
    """Re-hash every blob and verify every signature; exit 1 if anything is wrong."""
    from pathlib import Path


    if not (Path(args.db) / DB_NAME).is_file():
        raise PflError(f"no pool in {args.db} (missing {DB_NAME})")
    with PoolStore(args.db) as store:
        problems = store.verify()
        total = len(store)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{total} pieces checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def add_certs_command(subparsers) -> None:
    """Register ``pfl certs DIR --hosts ...`` on an argparse subparsers object."""
    certs = subparsers.add_parser("certs", help="create a dev CA and a TLS server certificate",
                                  description=cmd_certs.__doc__)
    certs.add_argument("directory", help="where ca.pem, ca.key, server.pem, server.key go")
    certs.add_argument("--hosts", type=_hosts, default=_hosts("localhost,127.0.0.1"),
                       help="comma-separated host names and IPs (default %(default)s)")
    certs.add_argument("--new-ca", action="store_true",
                       help="replace an existing CA (clients must get the new ca.pem)")
    certs.set_defaults(func=cmd_certs)


def add_pool_commands(subparsers) -> None:
    """Register ``pfl pool serve`` and ``pfl pool check`` on an argparse subparsers object."""
    pool = subparsers.add_parser("pool", help="the piece pool").add_subparsers(
        dest="pool_command", metavar="SUBCOMMAND", required=True)
    serve = pool.add_parser("serve", help="serve the piece pool over gRPC with TLS",
                            description=cmd_pool_serve.__doc__)
    serve.add_argument("--db", required=True, help="pool directory (created if missing)")
    serve.add_argument("--port", type=int, default=50061, help="0 picks a free port "
                       "(default %(default)s)")
    serve.add_argument("--certs", required=True, help="certificate directory from `pfl certs`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--run-config", default=None, metavar="FILE",
                       help="the run config (TOML) that `flwr run --run-config` gets: pieces "
                            "are checked against its model (the way to keep the two in step)")
    serve.add_argument("--model", default=None,
                       help="check every piece against this model's layers and shapes "
                            "(smollm2-135m, tiny or a checkpoint path), when no --run-config")
    serve.add_argument("--max-update-norm", type=float, default=None,
                       help="refuse pieces whose update |scaling * B A| exceeds this "
                            "(default 8; honest SmolLM2 pieces are about 0.1)")
    serve.add_argument("--max-norm-ratio", type=float, default=None,
                       help="list no piece whose update norm exceeds this multiple of the "
                            "median at its layer and module (default 10; 0: off)")
    serve.add_argument("--open", action="store_true",
                       help="open enrolment: take pieces from any device key, without a "
                            "federation grant (development only; the default needs "
                            "CERTS/federation.pub from `pfl certs`)")
    serve.set_defaults(func=cmd_pool_serve)
    check = pool.add_parser("check", help="verify every stored piece",
                            description=cmd_pool_check.__doc__)
    check.add_argument("--db", required=True, help="pool directory")
    check.set_defaults(func=cmd_pool_check)


def cmd_serve(args) -> int:
    """Serve personalized answers from one copy of the base model until interrupted: the
    stage-1 model, PER-PCS recipes against the pool, inline PerFit stage 2 and uploaded OPPU
    adapters, many users in each batch."""
    from dataclasses import fields

    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from cloud_server.inference_service import ServeLimits, serve as serve_inference

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)
                            if getattr(args, f.name, None) is not None})
    model, arrays = serve_inputs(args.run, args.model, args.arrays)
    if arrays is None:
        print("pfl serve: warning: no collective arrays (--run RUN_DIR): answers come from "
              "the raw base model, without stage 1 or PerFit", flush=True)
    if args.pool_db is None:
        print("pfl serve: note: no --pool-db: PER-PCS users are refused", flush=True)
    clients = None
    if args.clients is not None:
        from shared.crypto import read_public_keys  # lazy: only a client list is read

        clients = read_public_keys(args.clients)
    else:
        print("pfl serve: note: no --clients: any device key may call (each key sees only "
              "its own adapters)", flush=True)
    return serve_inference(args.certs, host=args.host, port=args.port, model=model,
                           arrays=arrays, pool_db=args.pool_db, limits=limits,
                           device=args.device, clients=clients)


def serve_inputs(run: str | None, model: str | None, arrays: str | None
                 ) -> tuple[str | None, str | None]:
    """(model, arrays file) to serve: a run folder's (``--run``: its model and its
    global_arrays.npz), or the flags; a model that differs from the run's is an error."""
    if run is None:
        return model, arrays
    if arrays is not None:
        raise PflError("give --run RUN_DIR or --arrays FILE, not both")
    from cloud_server.federation import read_run  # lazy: Flower loads with it

    summary, path = read_run(run)
    if model is not None and model != summary["model"]:
        raise PflError(f"--model {model}, but the run {run} trained {summary['model']}")
    return str(summary["model"]), None if path is None else str(path)


def add_serve_command(subparsers) -> None:
    """Register ``pfl serve`` (the inference service) on an argparse subparsers object."""
    from dataclasses import fields

    # lazy: the service's module loads torch, which `pfl --help` must not
    from cloud_server.inference_service import ServeLimits

    serve_cmd = subparsers.add_parser(
        "serve", help="the inference service: personalized answers over gRPC with TLS",
        description=cmd_serve.__doc__)
    serve_cmd.add_argument("--certs", required=True, help="certificate directory from `pfl certs`")
    serve_cmd.add_argument("--port", type=int, default=50071,
                           help="0 picks a free port (default %(default)s)")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_cmd.add_argument("--model", default=None, help="base model (default smollm2-135m)")
    serve_cmd.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    serve_cmd.add_argument("--run", default=None, metavar="RUN_DIR",
                           help="a federation's run folder: its model, stage 1 and PerFit "
                                "stage 1 (RUN_DIR/global_arrays.npz)")
    serve_cmd.add_argument("--arrays", default=None,
                           help="a collective arrays file instead of --run (without either: "
                                "the raw base, no PerFit)")
    serve_cmd.add_argument("--pool-db", default=None,
                           help="the piece pool's directory, to resolve PER-PCS recipes")
    serve_cmd.add_argument("--clients", default=None, metavar="FILE",
                           help="the device public keys that may call, one a line (`pfl "
                                "device-key` prints a device's); default: any device key")
    defaults = ServeLimits()
    for f in fields(ServeLimits):
        serve_cmd.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                               type=type(getattr(defaults, f.name)), default=None,
                               help=f"(default {getattr(defaults, f.name)})")
    serve_cmd.set_defaults(func=cmd_serve)
