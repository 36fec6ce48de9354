"""``pfl generate``: a device answers one query for its user, locally or by the cloud.

    pfl generate --state RUN/clients/partition-00001 --arrays RUN/global_arrays.npz \\
        --method perfit --prompt "a pair of waterproof hiking boots, bought on sale"
    pfl generate ... --remote 10.0.0.5:50071 --ca certs/ --consent consent.toml
    pfl generate ... --backend onnx          # ONNX Runtime on the exported graph

Remote answering needs the consent rule ``inference.remote`` (off by default); each request
is an entry of the device's audit ledger (``--ledger``, default STATE/ledger.jsonl) with the
rule, the destination, the prompt's sha256 and every tensor sent. Each request is signed
with the device key (``--device-key``, default STATE/device.key): the service knows the
device by it, and an adapter this device uploads is usable by this key only.
"""

from __future__ import annotations

from pathlib import Path

from edge_client.ondevice import BACKENDS
from shared.errors import PflError


def cmd_generate(args) -> int:
    """Answer a query with a method's saved personal state, on this device or remotely."""
    import numpy as np

    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from edge_client.phases import answer_query
    from edge_client.pool_pieces import PoolPieces
    from shared.data import load_dataset
    from shared.models import load_model
    from shared.prompts import build_prompt

    task = load_dataset(args.task, args.data).task
    prompt = args.prompt if args.raw else build_prompt(args.prompt, task=task)
    arrays = {}
    if args.arrays:
        with np.load(args.arrays, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    # an ONNX backend exports the graph from a model on the CPU: there "auto" means the CPU,
    # even on a machine with CUDA
    device = args.device or ("cpu" if args.backend != "torch" else None)
    loaded = load_model(args.model, device=device)
    pool = PoolPieces(args.pool, args.ca) if args.pool else None
    remote = None
    if args.remote:
        remote = _remote_client(args)
    try:
        text = answer_query(loaded, task, args.method, prompt, state_dir=args.state,
                            arrays=arrays, pool=pool, remote=remote,
                            max_new_tokens=args.max_new_tokens, backend=args.backend)
    finally:
        if remote is not None:
            remote.close()
    print(text)
    return 0


def _remote_client(args):
    # lazy: only a remote answer needs gRPC and the ledger
    from edge_client.audit import AuditClientInterceptor
    from edge_client.consent import ConsentPolicy
    from edge_client.inference_client import InferenceClient, inference_describer
    from shared import crypto

    if not args.ca:
        raise PflError("--remote needs --ca (the CA certificate or `pfl certs` directory)")
    policy = ConsentPolicy.load(args.consent)
    policy.require("inference_remote")  # fail before anything is built or sent
    ledger = args.ledger or (Path(args.state) / "ledger.jsonl" if args.state else None)
    if ledger is None:
        raise PflError("--remote needs --ledger (or --state, whose ledger.jsonl is used)")
    key_path = args.device_key or (Path(args.state) / "device.key" if args.state else None)
    if key_path is None:
        raise PflError("--remote needs --device-key (or --state, whose device.key is used)")
    key = crypto.device_key(key_path)
    describer = inference_describer(policy, crypto.public_key_bytes(key))
    interceptor = AuditClientInterceptor(ledger, "inference-grpc", args.remote, describer)
    return InferenceClient(args.remote, args.ca, key=key, interceptors=[interceptor])


def add_generate_command(subparsers) -> None:
    """Register ``pfl generate`` on an argparse subparsers object."""
    gen = subparsers.add_parser("generate", help="answer a query for a user, locally or by "
                                "the cloud's inference service", description=cmd_generate.__doc__)
    gen.add_argument("--prompt", required=True,
                     help="the query's input (formatted with --task's prompt; --raw: as is)")
    gen.add_argument("--raw", action="store_true", help="send --prompt as the whole prompt")
    gen.add_argument("--task", default="synthetic", help="the task (prompt format, answer "
                     "length; default %(default)s)")
    gen.add_argument("--data", default=None, help="the task's data (HuffPost tasks: labels)")
    gen.add_argument("--method", default="nonpersonalized",
                     help="nonpersonalized, lora-c, oppu, perpcs, perfit, perfit-c ...")
    gen.add_argument("--state", default=None,
                     help="the device's folder (RUN/clients/partition-N): personal/METHOD/")
    gen.add_argument("--arrays", default=None,
                     help="the federation's global_arrays.npz (stage 1, PerFit stage 1)")
    gen.add_argument("--model", default=None, help="base model (default smollm2-135m)")
    gen.add_argument("--device", default=None,
                     help="cpu or cuda (default: cuda if present with --backend torch, else cpu)")
    gen.add_argument("--pool", default=None, metavar="HOST:PORT",
                     help="the piece pool (PER-PCS recipes name its pieces)")
    gen.add_argument("--remote", default=None, metavar="HOST:PORT",
                     help="answer with the cloud's inference service (consent "
                          "inference.remote)")
    gen.add_argument("--ca", default=None, help="CA certificate or `pfl certs` directory")
    gen.add_argument("--consent", default=None, help="the device's consent policy (TOML)")
    gen.add_argument("--ledger", default=None, help="the device's audit ledger")
    gen.add_argument("--device-key", default=None,
                     help="the key that signs remote calls (default STATE/device.key, created "
                          "if missing; the service knows this device by it)")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--backend", default="torch",
                     choices=BACKENDS,
                     help="answer locally with PyTorch (default) or ONNX Runtime on the "
                          "exported graph (pfl export onnx), fp32 or weight-only quantized")
    gen.set_defaults(func=cmd_generate)
