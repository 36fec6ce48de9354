"""Piece pool: crypto, wire serialization and validation, the store, the TLS gRPC service."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from cloud_server.pool_cli import add_certs_command, add_pool_commands
from cloud_server.pool_service import PoolServer
from cloud_server.pool_store import PieceNotFound, PoolCorruption, PoolStore
from edge_client.pool_client import PoolClient, PoolError
from shared import crypto
from shared.errors import PflError
from shared.methods.perpcs.pieces import Piece
from shared.methods.perpcs.recipe import Recipe
from shared.methods.perpcs.wire import recipe_from_proto, recipe_to_proto
from shared.serialization import (InvalidPiece, Limits, SignedPiece, content_bytes,
                                  piece_for_wire, piece_from_content_bytes, piece_from_proto,
                                  piece_to_proto)
from shared.wire import pfl_pb2, pfl_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def make_piece(sharer="alice", layer=1, module="q_proj", seed=0, r=2, d_in=8, d_out=6,
               gate=True, dtype=torch.float32) -> Piece:
    g = torch.Generator().manual_seed(seed)
    return Piece(sharer, layer, module, torch.randn(r, d_in, generator=g).to(dtype),
                 torch.randn(d_out, r, generator=g).to(dtype) * 0.1, 0.5,
                 torch.randn(d_in, generator=g) if gate else None)


def set_tensor(msg: pfl_pb2.Tensor, array: np.ndarray) -> None:
    """Overwrite a wire tensor's bytes (keeping dtype and shape) with a valid sha256."""
    msg.data = array.astype("<f4").tobytes()
    msg.sha256 = hashlib.sha256(msg.data).hexdigest()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return crypto.write_dev_certs(tmp_path_factory.mktemp("certs")).directory


@pytest.fixture(scope="module")
def keys():
    return {"alice": crypto.generate_device_key(), "bob": crypto.generate_device_key()}


# ----------------------------------------------------------------------------- crypto
def test_dev_ca_server_cert_verifies_for_localhost_and_ip(certs, tmp_path):
    server_pem, ca_pem = (certs / "server.pem").read_bytes(), (certs / "ca.pem").read_bytes()
    crypto.verify_server_cert(server_pem, ca_pem, "localhost")
    crypto.verify_server_cert(server_pem, ca_pem, "127.0.0.1")
    with pytest.raises(PflError, match="example.org"):
        crypto.verify_server_cert(server_pem, ca_pem, "example.org")
    other = crypto.write_dev_certs(tmp_path / "other")
    with pytest.raises(PflError):
        crypto.verify_server_cert(server_pem, other.ca_cert.read_bytes(), "localhost")
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0  # private keys are 0600


def test_sign_verify_and_tampering(tmp_path):
    key = crypto.generate_device_key()
    pid = make_piece().piece_id
    sig = crypto.sign_piece(key, pid, "alice")
    pub = crypto.public_key_bytes(key)
    crypto.verify_piece(pub, pid, "alice", sig)
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    for args in ((pub, pid, "alice", bad), (pub, pid, "mallory", sig),
                 (pub, make_piece(seed=1).piece_id, "alice", sig), (pub, pid, "alice", b""),
                 (crypto.public_key_bytes(crypto.generate_device_key()), pid, "alice", sig)):
        with pytest.raises(crypto.SignatureError):
            crypto.verify_piece(*args)
    crypto.save_device_key(key, tmp_path / "dev.key", password=b"pw")
    loaded = crypto.load_device_key(tmp_path / "dev.key", password=b"pw")
    assert crypto.public_key_bytes(loaded) == pub
    assert crypto.public_key_bytes(crypto.device_key(tmp_path / "new.key")) == \
        crypto.public_key_bytes(crypto.device_key(tmp_path / "new.key"))


def test_generated_wire_code_is_up_to_date(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    subprocess.run(["bash", str(REPO / "proto/generate.sh")], env=env, check=True,
                   capture_output=True, timeout=120)
    for name in ("pfl_pb2.py", "pfl_pb2.pyi", "pfl_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (REPO / "shared/wire" / name).read_text(), \
            f"shared/wire/{name} is stale: run proto/generate.sh"


# ---------------------------------------------------------------------- serialization
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gate", [True, False])
def test_round_trip_is_bit_exact(dtype, gate):
    piece = make_piece(dtype=dtype, gate=gate)
    wire = pfl_pb2.Piece.FromString(piece_to_proto(piece).SerializeToString())
    back = piece_from_proto(wire)
    assert back.piece_id == piece.piece_id and back.sharer == piece.sharer
    assert torch.equal(back.A, piece.A) and back.A.dtype == dtype
    assert torch.equal(back.B, piece.B) and back.scaling == piece.scaling
    assert (back.gate is None) if not gate else torch.equal(back.gate, piece.gate)
    blob = content_bytes(piece)
    assert hashlib.sha256(blob).hexdigest() == piece.piece_id
    assert piece_from_content_bytes(blob, "alice", piece.piece_id).piece_id == piece.piece_id


def _corrupt(mutate) -> pfl_pb2.Piece:
    msg = piece_to_proto(make_piece())
    mutate(msg)
    return msg


@pytest.mark.parametrize("mutate, message", [
    (lambda m: set_tensor(m.a, np.full((2, 8), np.nan)), "A has non-finite"),
    (lambda m: set_tensor(m.gate, np.full(8, np.inf)), "gate has non-finite"),
    (lambda m: set_tensor(m.b, np.full((6, 2), 1e5)), "B norm .* exceeds the norm bound"),
    (lambda m: m.b.shape.__setitem__(1, 3), r"48 bytes for shape \(6, 3\)"),
    (lambda m: (m.b.shape.__setitem__(slice(None), [4, 3]), None), "B must be"),
    (lambda m: (m.gate.shape.__setitem__(0, 4), set_tensor(m.gate, np.zeros(4))),
     r"gate must be \(d_in=8"),
    (lambda m: setattr(m, "rank", 3), "declared rank 3"),
    (lambda m: setattr(m.a, "dtype", "bfloat16"), "dtype 'bfloat16' is not allowed"),
    (lambda m: setattr(m.a, "dtype", "int8"), "dtype 'int8' is not allowed"),
    (lambda m: setattr(m.a, "sha256", "0" * 64), "sha256"),
    (lambda m: setattr(m, "piece_id", "ab" * 32), "does not match the content"),
    (lambda m: setattr(m, "module", "q_proj; DROP"), "module name"),
    (lambda m: setattr(m, "sharer", ""), "sharer pseudonym"),
    (lambda m: setattr(m, "scaling", float("nan")), "scaling"),
    (lambda m: m.ClearField("b"), "A and B are both required"),
])
def test_validation_rejects_bad_payloads(mutate, message):
    with pytest.raises(InvalidPiece, match=message):
        piece_from_proto(_corrupt(mutate))


def test_validation_size_bounds_and_bf16():
    msg = piece_to_proto(make_piece(d_in=64, d_out=64))
    with pytest.raises(InvalidPiece, match="size bound"):
        piece_from_proto(msg, Limits(max_piece_bytes=256))
    with pytest.raises(InvalidPiece, match="dimension bound"):
        piece_from_proto(msg, Limits(max_dim=32))
    with pytest.raises(InvalidPiece, match="rank 2 is out of range"):
        piece_from_proto(msg, Limits(max_rank=1))
    bf16 = make_piece(dtype=torch.bfloat16)
    with pytest.raises(InvalidPiece, match="bfloat16 is not allowed"):
        piece_to_proto(bf16)
    fixed = piece_for_wire(bf16)
    assert fixed.A.dtype == torch.float32 and piece_from_proto(piece_to_proto(fixed)).piece_id \
        == fixed.piece_id


def test_recipe_round_trip():
    ids = [make_piece(seed=s).piece_id for s in range(3)]
    recipe = Recipe({(1, "q_proj"): ((ids[0], 0.7), (ids[1], 0.3)),
                     (0, "v_proj"): ((ids[2], 1.0),)}, config={"top_k": 2})
    assert recipe_from_proto(pfl_pb2.Recipe.FromString(
        recipe_to_proto(recipe).SerializeToString())) == recipe
    bad = recipe_to_proto(recipe)
    bad.entries[0].items[0].piece_id = "nope"
    with pytest.raises(InvalidPiece, match="malformed piece id"):
        recipe_from_proto(bad)


# ---------------------------------------------------------------------------- store
POOL = {"pool": True}  # the consent flag every pooled piece carries


def signed(piece, key, **consent):
    return SignedPiece.sign(piece, key, consent or {"pool": True})


def test_store_submit_list_fetch_idempotent_and_persistent(tmp_path, keys):
    pieces = [make_piece(layer=layer, module=m, seed=i)
              for i, (layer, m) in enumerate([(0, "q_proj"), (0, "v_proj"), (1, "q_proj")])]
    ungated = make_piece(layer=1, module="q_proj", seed=9, gate=False)
    with PoolStore(tmp_path / "pool") as store:
        results = store.submit([signed(p, keys["alice"]) for p in pieces + [ungated]])
        assert [c for _, c in results] == [True] * 4 and len(store) == 4
        assert store.submit([signed(pieces[0], keys["alice"])]) == [(pieces[0].piece_id, False)]
        assert len(store) == 4
        gates = store.list_gates(layers=[0])
        assert [g.piece_id for g in gates] == [pieces[0].piece_id, pieces[1].piece_id]
        assert [g.piece_id for g in store.list_gates(modules=["q_proj"])] == \
            [pieces[0].piece_id, pieces[2].piece_id]  # the ungated piece has no gate
        assert torch.equal(gates[0].verify().gate, pieces[0].gate)
    with PoolStore(tmp_path / "pool") as store:  # reopened
        got = store.fetch([pieces[2].piece_id, ungated.piece_id])
        assert [s.piece_id for s in got] == [pieces[2].piece_id, ungated.piece_id]
        assert torch.equal(got[0].piece.B, pieces[2].B) and got[0].consent == {"pool": True}
        got[0].verify()
        assert store.verify() == []
        with pytest.raises(PieceNotFound, match="1 piece"):
            store.fetch([make_piece(seed=42).piece_id])


def test_store_detects_tampered_blob(tmp_path, keys):
    piece = make_piece()
    with PoolStore(tmp_path / "pool") as store:
        store.submit([signed(piece, keys["alice"])])
        path = store.blob_path(piece.piece_id)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(PoolCorruption, match="does not hash to its id"):
            store.fetch([piece.piece_id])
        assert len(store.verify()) == 1
        store.submit([signed(piece, keys["alice"])])  # resubmitting repairs the blob
        assert store.fetch([piece.piece_id])[0].piece_id == piece.piece_id


def test_store_batches_are_all_or_nothing_and_keys_are_bound(tmp_path, keys):
    good, other = make_piece(seed=1), make_piece(seed=2)
    forged = SignedPiece(other, b"\0" * 64, crypto.public_key_bytes(keys["alice"]))
    with PoolStore(tmp_path / "pool") as store:
        with pytest.raises(crypto.SignatureError):
            store.submit([signed(good, keys["alice"]), forged])
        assert len(store) == 0 and not any(store.blob_dir.rglob("*" + good.piece_id))
        store.submit([signed(good, keys["alice"])])
        with pytest.raises(crypto.SignatureError, match="bound to another public key"):
            store.submit([signed(other, keys["bob"])])  # bob's key, alice's pseudonym
        assert store.piece_ids() == [good.piece_id]
        assert not store.blob_path(other.piece_id).exists()  # its blob was removed again


# ---------------------------------------------------------------------------- service
@pytest.fixture
def server(tmp_path, certs):
    store = PoolStore(tmp_path / "pool")
    srv = PoolServer(store, certs, port=0, own_store=True)
    try:
        yield srv
    finally:
        srv.stop(grace=0)


@pytest.fixture
def client(server, certs):
    with PoolClient(server.target, certs, timeout=20) as c:
        yield c


def raw_submit(server, certs, *messages):
    """Send pieces without the client's own checks (what a bad or malicious client does)."""
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(server.target, creds) as channel:
        stub = pfl_pb2_grpc.PiecePoolStub(channel)
        return stub.SubmitPieces(pfl_pb2.SubmitPiecesRequest(pieces=list(messages)), timeout=20)


def test_service_submit_list_fetch(server, client, certs, keys):
    pieces = [make_piece("alice", layer=2, module="q_proj", seed=1),
              make_piece("alice", layer=2, module="v_proj", seed=2)]
    bob = make_piece("bob", layer=2, module="q_proj", seed=3)
    assert [c for _, c in client.submit(pieces, keys["alice"], {"pool": True})] == [True, True]
    assert client.submit([bob], keys["bob"], POOL) == [(bob.piece_id, True)]
    assert client.submit(pieces[:1], keys["alice"], POOL) == [(pieces[0].piece_id, False)]
    gates = client.list_gates(layers=[2], modules=["q_proj"])
    assert {g.piece_id for g in gates} == {pieces[0].piece_id, bob.piece_id}
    assert client.list_gates(sharers=["bob"])[0].sharer == "bob"
    fetched = client.fetch([bob.piece_id, pieces[1].piece_id])
    assert [f.piece_id for f in fetched] == [bob.piece_id, pieces[1].piece_id]
    assert torch.equal(fetched[1].piece.A, pieces[1].A) and fetched[1].consent == {"pool": True}
    assert client.fetch_pieces([bob.piece_id])[bob.piece_id].piece_id == bob.piece_id
    with pytest.raises(PoolError) as err:
        client.fetch([make_piece(seed=99).piece_id])
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with PoolClient(server.target, certs, trusted_keys={
            "alice": crypto.public_key_bytes(keys["alice"])}) as pinned:
        assert pinned.fetch([pieces[0].piece_id])[0].piece.sharer == "alice"
        with pytest.raises(crypto.SignatureError, match="'bob' is not trusted"):
            pinned.fetch([bob.piece_id])


def test_service_rejects_unsigned_and_badly_signed(server, client, certs, keys):
    good = make_piece(seed=1)
    unsigned = piece_to_proto(make_piece(seed=2))
    for bad, detail in [(unsigned, "unsigned"),
                        (SignedPiece(make_piece(seed=3), b"\1" * 64,
                                     crypto.public_key_bytes(keys["alice"])).to_proto(),
                         "signature does not verify")]:
        with pytest.raises(grpc.RpcError) as err:
            raw_submit(server, certs, signed(good, keys["alice"]).to_proto(), bad)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "piece 1" in err.value.details() and detail in err.value.details()
        assert len(server.store) == 0
    forged = signed(make_piece(seed=4), keys["alice"])
    with pytest.raises(PoolError) as err:  # a signature binds the pseudonym too
        client.submit_signed([SignedPiece(make_piece("mallory", seed=4), forged.signature,
                                          forged.public_key)])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and len(server.store) == 0


def test_service_rejects_nan_piece_and_leaves_pool_unchanged(server, client, certs, keys):
    client.submit([make_piece(seed=5)], keys["alice"], POOL)
    nan = signed(make_piece(seed=6), keys["alice"]).to_proto()
    set_tensor(nan.a, np.full((2, 8), np.nan))
    with pytest.raises(grpc.RpcError) as err:
        raw_submit(server, certs, signed(make_piece(seed=7), keys["alice"]).to_proto(), nan)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "piece 1: piece (1, q_proj): A has non-finite values " \
                                  "(NaN or inf)"
    assert server.store.piece_ids() == [make_piece(seed=5).piece_id]


def test_service_restart_keeps_pieces(tmp_path, certs, keys):
    piece = make_piece(seed=8)
    for round_ in range(2):
        store = PoolStore(tmp_path / "pool")
        srv = PoolServer(store, certs, port=0, own_store=True)
        try:
            with PoolClient(srv.target, certs, timeout=20) as c:
                if round_ == 0:
                    c.submit([piece], keys["alice"], POOL)
                assert c.fetch([piece.piece_id])[0].piece_id == piece.piece_id
        finally:
            srv.stop(grace=0)


def test_client_with_wrong_root_certificate_cannot_connect(server, tmp_path):
    other = crypto.write_dev_certs(tmp_path / "other")
    with PoolClient(server.target, other.directory, timeout=10) as c:
        with pytest.raises(PoolError) as err:
            c.list_gates()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_interceptor_sees_outbound_calls(server, certs, keys):
    seen = []

    class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            seen.append((details.method, request.ByteSize()))
            return continuation(details, request)

        def intercept_unary_stream(self, continuation, details, request):
            seen.append((details.method, request.ByteSize()))
            return continuation(details, request)

    with PoolClient(server.target, certs, interceptors=[Recorder()], timeout=20) as c:
        c.submit([make_piece(seed=10)], keys["alice"], POOL)
        c.list_gates()
    assert [m for m, _ in seen] == ["/pfl.v1.PiecePool/SubmitPieces",
                                    "/pfl.v1.PiecePool/ListGates"]
    assert seen[0][1] > 100


# ------------------------------------------------------------------------ processes / CLI
def _start_process(db, certs) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cloud_server.pool_service", "--db", str(db),
                             "--port", "0", "--certs", str(certs), "--open"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, lines = time.monotonic() + 120, []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                lines.append(line)
                match = re.search(r"on (\S+:\d+) \(TLS", line)
                if match:
                    return proc, match.group(1)
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError(f"pool server did not start: {''.join(lines)}")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_killed_server_process_restarts_with_data_intact(tmp_path, certs, keys):
    pieces = [make_piece(layer=layer, seed=layer) for layer in range(3)]
    db, procs = tmp_path / "pool", []
    try:
        proc, target = _start_process(db, certs)
        procs.append(proc)
        with PoolClient(target, certs, timeout=30) as c:
            assert all(created for _, created in c.submit(pieces, keys["alice"], POOL))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc, target = _start_process(db, certs)
        procs.append(proc)
        with PoolClient(target, certs, timeout=30) as c:
            got = c.fetch([p.piece_id for p in pieces])
            assert [torch.equal(g.piece.A, p.A) for g, p in zip(got, pieces)] == [True] * 3
            assert len(c.list_gates()) == 3
        proc.send_signal(signal.SIGTERM)  # a clean stop too
        assert proc.wait(timeout=30) == 0
    finally:
        for proc in procs:
            _stop(proc)
    with PoolStore(db) as store:
        assert store.verify() == [] and len(store) == 3


def test_cli_registration_certs_and_pool_check(tmp_path, keys, capsys):
    parser = argparse.ArgumentParser(prog="pfl")
    commands = parser.add_subparsers(dest="command", required=True)
    add_certs_command(commands)
    add_pool_commands(commands)
    args = parser.parse_args(["certs", str(tmp_path / "c"), "--hosts",
                              "localhost,127.0.0.1,pool.lan"])
    assert args.func(args) == 0
    crypto.verify_server_cert((tmp_path / "c/server.pem").read_bytes(),
                              (tmp_path / "c/ca.pem").read_bytes(), "pool.lan")
    with PoolStore(tmp_path / "pool") as store:
        store.submit([signed(make_piece(), keys["alice"])])
    args = parser.parse_args(["pool", "check", "--db", str(tmp_path / "pool")])
    assert args.func(args) == 0 and "1 pieces checked, 0 problem(s)" in capsys.readouterr().out
    serve = parser.parse_args(["pool", "serve", "--db", "d", "--port", "0", "--certs", "c"])
    assert (serve.port, serve.host) == (0, "127.0.0.1")
    with pytest.raises(PflError, match="no pool"):
        args.func(parser.parse_args(["pool", "check", "--db", str(tmp_path / "none")]))


def test_store_lists_no_gate_of_a_piece_far_above_the_median_at_its_layer_and_module(
        tmp_path, keys):
    """The pool's relative bound: of four pieces at one (layer, module), the one whose update
    is 50x the others' (well inside the absolute bound) is not listed, whoever submitted it
    first; at a (layer, module) with two pieces there is no median to speak of, both are
    listed; ratio 0 lists all. A version-1 pool (no norm column) gains the norms when opened."""
    import sqlite3

    def scaled(piece, factor):
        return Piece(piece.sharer, piece.layer, piece.module, piece.A, piece.B * factor,
                     piece.scaling, piece.gate)

    big = scaled(make_piece("bob", seed=10), 5.0)
    honest = [scaled(make_piece("alice", seed=s), 0.1) for s in (11, 12, 13)]
    pair = [scaled(make_piece("alice", layer=2, seed=14), 0.1),
            scaled(make_piece("bob", layer=2, seed=15), 5.0)]
    with PoolStore(tmp_path / "pool") as store:
        store.submit([signed(big, keys["bob"]), signed(pair[1], keys["bob"])])
        store.submit([signed(p, keys["alice"]) for p in honest + pair[:1]])
        listed = {g.piece_id for g in store.list_gates()}
        assert big.piece_id not in listed
        assert {p.piece_id for p in honest + pair} <= listed
    with PoolStore(tmp_path / "pool", max_norm_ratio=0) as store:
        assert big.piece_id in {g.piece_id for g in store.list_gates()}
    db = sqlite3.connect(tmp_path / "pool" / "pool.sqlite3")
    db.execute("ALTER TABLE pieces DROP COLUMN update_norm")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with PoolStore(tmp_path / "pool") as store:
        assert {g.piece_id for g in store.list_gates()} == listed
