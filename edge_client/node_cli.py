"""``pfl node-key PATH``: a device's SuperNode authentication key, made on the device.

    pfl node-key ~/.pfl/supernode.key          # writes the key (0600) and supernode.key.pub
    # the operator registers the public half (flwr's Control API, TLS):
    flwr supernode register supernode.key.pub deploy
    # the device joins with it; an unregistered key is refused by the SuperLink:
    flower-supernode --auth-supernode-private-key ~/.pfl/supernode.key ...
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
