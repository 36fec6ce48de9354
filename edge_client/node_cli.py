"""``pfl node-key PATH``: a device's SuperNode authentication key, made on the device.

    pfl node-key ~/.pfl/supernode.key          # writes the key (0600) and supernode.key.pub
    # the operator registers the public half (flwr's Control API, TLS):
    flwr supernode register supernode.key.pub deploy
    # the device joins with it; an unregistered key is refused by the SuperLink:
    flower-supernode --auth-supernode-private-key ~/.pfl/supernode.key ...

``pfl device-key PATH``: the device's Ed25519 key that signs its pool pieces and its calls to
the inference service; prints the public half an operator puts on ``pfl serve --clients``.
"""

from __future__ import annotations


def cmd_node_key(args) -> int:
    """Create (or reuse) this device's SuperNode key; print the public half to register."""
    # lazy: a command loads only what it runs
    from shared.crypto import write_supernode_key

    private, public = write_supernode_key(args.path)
    print(f"private key: {private}  (mode 0600; flower-supernode --auth-supernode-private-key)")
    print(f"public key:  {public}  (the operator runs: flwr supernode register {public.name} "
          "FEDERATION)")
    return 0


def add_node_key_command(subparsers) -> None:
    """Register ``pfl node-key`` on an argparse subparsers object."""
    key = subparsers.add_parser("node-key", help="a device's SuperNode authentication key",
                                description=cmd_node_key.__doc__)
    key.add_argument("path", help="where the private key goes (the public key: PATH.pub)")
    key.set_defaults(func=cmd_node_key)


def cmd_device_key(args) -> int:
    """Create (or reuse) this device's signing key; print its public key and pseudonym."""
    # lazy: a command loads only what it runs
    from shared import crypto

    public = crypto.public_key_bytes(crypto.device_key(args.path))
    print(public.hex())
    print(f"# {args.path}: pseudonym {crypto.sharer_pseudonym(public)}; the line above goes "
          "on `pfl serve --clients FILE`", flush=True)
    return 0


def add_device_key_command(subparsers) -> None:
    """Register ``pfl device-key`` on an argparse subparsers object."""
    key = subparsers.add_parser("device-key", help="a device's signing key (pool pieces, "
                                "inference calls)", description=cmd_device_key.__doc__)
    key.add_argument("path", help="the private key (created, mode 0600, if missing; a "
                     "device's is STATE/device.key)")
    key.set_defaults(func=cmd_device_key)
