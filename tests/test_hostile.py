"""Hostile participants, on the real services over loopback: a fake sharer and a stranger
against the TLS piece pool, a fake server against a device's real ClientApp, and fake clients
against the server's FedAvg. Each attack asserts that it is refused and that nothing changed:
the pool's rows, the device's ledger, the global model.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from cloud_server import pool_service
from cloud_server.aggregation import Reply, average_metrics, fedavg
from cloud_server.pool_service import PoolServer
from cloud_server.pool_store import PoolStore
from edge_client.audit import AuditLedger, read_entries, verify
from edge_client.client_app import make_client_app
from edge_client.consent import ConsentPolicy
from edge_client.phases import trusted_sharers
from edge_client.pool_pieces import fetch_pool
from edge_client.pool_client import PoolClient, PoolError
from shared import crypto
from shared.errors import (BAD_REQUEST, CONSENT_DENIED, DEVICE_ERRORS, FAILED, NOT_CONFIGURED,
                           PflError)
from shared.methods.perpcs.pieces import Piece
from shared.metrics import check_stats, metric_stats
from shared.serialization import Grant, Limits, ModelShapes, SignedPiece
from shared.tasks import news_category
from shared.wire import pfl_pb2, pfl_pb2_grpc
from simulations.simulate import LocalGrid

SECRET = "MY PRIVATE DIAGNOSIS: flu"
POOL = {"pool": True}
SHAPES = ModelShapes.of("tiny")  # 4 layers; q_proj 64->64, k_proj 64->32, ...


def piece(sharer: str, layer: int = 1, module: str = "q_proj", seed: int = 0, *,
          d_in: int | None = None, d_out: int | None = None, scaling: float = 0.5,
          r: int = 2) -> Piece:
    """An honest-looking gated piece that fits the tiny model (or the shape asked)."""
    d_in0, d_out0 = SHAPES.modules.get(module, (64, 64))
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = d_in or d_in0, d_out or d_out0
    return Piece(sharer, layer, module, torch.randn(r, d_in, generator=g) * 0.1,
                 torch.randn(d_out, r, generator=g) * 0.01, scaling,
                 torch.randn(d_in, generator=g))


def pseudonym(key) -> str:
    return "sharer-" + crypto.key_fingerprint(crypto.public_key_bytes(key))[:16]


# ================================================================== the pool, attacked
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A TLS pool that takes pieces only with grants signed by the federation key, checked
    against the tiny model; one honest sharer has submitted one piece."""
    root = tmp_path_factory.mktemp("hostile-pool")
    certs = crypto.write_dev_certs(root / "certs").directory
    private, _ = crypto.write_federation_key(certs)
    fed_key = crypto.load_device_key(private)
    server = pool_service.start_pool_server(root / "pool", certs, model="tiny",
                                            open_enrolment=False)
    honest = crypto.generate_device_key()
    grant = Grant.mint(fed_key, "run-1", 8)
    with PoolClient(server.target, certs) as client:
        client.submit([piece(pseudonym(honest), seed=1)], honest, POOL, grant)
    try:
        yield {"server": server, "certs": certs, "fed_key": fed_key, "honest": honest,
               "grant": grant}
    finally:
        server.stop()


def snapshot(store: PoolStore) -> tuple:
    """Everything an attack could change: piece ids, grants (with their counts), blobs."""
    db = sqlite3.connect(store.directory / "pool.sqlite3")
    try:
        grants = db.execute("SELECT grant_id, public_key, used FROM grants ORDER BY 1").fetchall()
        sharers = db.execute("SELECT sharer, public_key FROM sharers ORDER BY 1").fetchall()
    finally:
        db.close()
    blobs = sorted(p.name for p in store.blob_dir.glob("??/*"))
    return tuple(store.piece_ids()), tuple(grants), tuple(sharers), tuple(blobs)


def refused(federation, code: grpc.StatusCode, call, match: str = "") -> PoolError:
    """Run ``call(client)`` and check it fails with ``code`` and leaves the pool as it was."""
    store = federation["server"].store
    before = snapshot(store)
    with PoolClient(federation["server"].target, federation["certs"]) as client:
        with pytest.raises(PoolError) as info:
            call(client)
    assert info.value.code == code, info.value
    assert match in info.value.details
    assert snapshot(store) == before
    return info.value


def test_a_stranger_without_a_grant_cannot_submit(federation):
    stranger = crypto.generate_device_key()
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(pseudonym(stranger), seed=2)], stranger, POOL),
            "no grant")


def test_a_grant_the_stranger_signed_itself_is_refused(federation):
    stranger = crypto.generate_device_key()
    forged = Grant.mint(stranger, "run-1", 100)
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(pseudonym(stranger), seed=3)], stranger, POOL, forged),
            "grant refused")


def test_an_expired_grant_is_refused(federation):
    sharer = crypto.generate_device_key()
    expired = Grant.mint(federation["fed_key"], "run-1", 10, ttl_seconds=-1.0)
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(pseudonym(sharer), seed=4)], sharer, POOL, expired),
            "expired")


def test_a_grant_bound_to_one_sharer_cannot_be_used_by_another(federation):
    thief = crypto.generate_device_key()  # e.g. it read the grant off the wire
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(pseudonym(thief), seed=5)], thief, POOL,
                               federation["grant"]), "bound to another device key")


def test_a_sharer_cannot_submit_more_pieces_than_its_grant_allows(federation):
    sharer = crypto.generate_device_key()
    small = Grant.mint(federation["fed_key"], "run-1", 2)
    pieces = [piece(pseudonym(sharer), layer=layer, seed=10 + layer) for layer in range(3)]
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit(pieces, sharer, POOL, small), "allows 2 pieces")


def test_a_grant_covers_one_device_key_per_batch(federation):
    a, b = crypto.generate_device_key(), crypto.generate_device_key()
    grant = Grant.mint(federation["fed_key"], "run-1", 10)
    batch = [SignedPiece.sign(piece(pseudonym(a), seed=20), a, POOL),
             SignedPiece.sign(piece(pseudonym(b), seed=21), b, POOL)]
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit_signed(batch, grant), "one device key")


def test_a_grant_minted_for_a_device_key_is_useless_to_whoever_reads_it_first(federation):
    """A grant bound at selection to the sharer's key: a thief who presents it first (before
    the sharer) is refused, and the sharer can still use it. The key is signed into the grant:
    editing it breaks the signature."""
    sharer, thief = crypto.generate_device_key(), crypto.generate_device_key()
    grant = Grant.mint(federation["fed_key"], "run-1", 4,
                       public_key=crypto.public_key_bytes(sharer))
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(pseudonym(thief), seed=7)], thief, POOL, grant),
            "bound to another device key")
    edited = dataclasses.replace(grant, public_key=crypto.public_key_bytes(thief))
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(pseudonym(thief), seed=7)], thief, POOL, edited),
            "grant refused")
    with PoolClient(federation["server"].target, federation["certs"]) as client:
        assert client.submit([piece(pseudonym(sharer), seed=8)], sharer, POOL, grant)
    assert Grant.from_text(grant.to_text()) == grant


def test_a_granted_key_cannot_squat_another_devices_pseudonym(federation):
    """A selected sharer signs pieces named for the honest sharer's pseudonym: refused (it
    would otherwise take that name's place, and the honest device would be refused)."""
    squatter = crypto.generate_device_key()
    grant = Grant.mint(federation["fed_key"], "run-1", 10)
    victim = pseudonym(crypto.generate_device_key())
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            lambda c: c.submit([piece(victim, seed=6)], squatter, POOL, grant),
            "not the pseudonym")


def test_a_runs_targets_list_only_the_pieces_submitted_under_its_grants(federation):
    """Pieces are tied to the grant and run they came with: a grant minted for another run
    puts nothing in this run's listing, and a key cannot carry pieces from one run into the
    next (the pool lists by run; the same content under both runs is in both)."""
    store = federation["server"].store
    a, b = crypto.generate_device_key(), crypto.generate_device_key()
    this_run = Grant.mint(federation["fed_key"], "run-a", 4)
    other_run = Grant.mint(federation["fed_key"], "run-b", 4)
    again = Grant.mint(federation["fed_key"], "run-b", 4)
    p_a, p_b = piece(pseudonym(a), layer=2, seed=40), piece(pseudonym(b), layer=2, seed=41)
    with PoolClient(federation["server"].target, federation["certs"]) as client:
        client.submit([p_a], a, POOL, this_run)
        client.submit([p_b], b, POOL, other_run)
        client.submit([p_a], a, POOL, again)  # a's piece of run-a, submitted again in run-b
        run_a = {g.piece_id for g in client.list_gates(run="run-a")}
        run_b = {g.piece_id for g in client.list_gates(run="run-b")}
        everything = {g.piece_id for g in client.list_gates()}
        with pytest.raises(PoolError) as info:
            client.list_gates(run="bad run!")
    assert run_a == {p_a.piece_id}
    assert run_b == {p_a.piece_id, p_b.piece_id}
    assert {p_a.piece_id, p_b.piece_id} < everything  # the honest sharer's piece of run-1 too
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not {g.piece_id for g in store.list_gates(run="run-none")}


def _granted_submit(federation, make, consent=POOL):
    """A selected sharer (a valid grant) that turned hostile, with a client that checks
    nothing before sending."""
    sharer = crypto.generate_device_key()
    grant = Grant.mint(federation["fed_key"], "run-1", 10)

    def call(client):
        client.limits = Limits(max_update_norm=float("inf"))
        return client.submit([make(pseudonym(sharer))], sharer, consent, grant)
    return call


@pytest.mark.parametrize("make, match", [
    (lambda s: piece(s, layer=4096), "layers 0..3"),                     # beyond the model
    (lambda s: piece(s, module="zz_proj", d_in=64, d_out=64), "no module"),
    (lambda s: piece(s, d_in=32), "shape 32->64"),                        # wrong shape
    (lambda s: Piece(s, 1, "q_proj", torch.full((2, 64), 50.0),          # huge update,
                     torch.full((64, 2), 50.0), 100.0, torch.ones(64)),   # A, B in bounds
     "update"),
], ids=["layer-4096", "unknown-module", "wrong-shape", "huge-update"])
def test_pieces_the_model_has_no_place_for_are_refused(federation, make, match):
    refused(federation, grpc.StatusCode.INVALID_ARGUMENT, _granted_submit(federation, make),
            match)


def _raw_submit(federation, mutate):
    """Submit a granted, signed piece whose wire message ``mutate`` changed afterwards."""
    sharer = crypto.generate_device_key()
    grant = Grant.mint(federation["fed_key"], "run-1", 10)
    signed = SignedPiece.sign(piece(pseudonym(sharer), seed=30), sharer, POOL)

    def call(client):
        msg = signed.to_proto()
        mutate(msg)
        request = pfl_pb2.SubmitPiecesRequest(pieces=[msg], grant=grant.to_proto())
        try:
            client._stub.SubmitPieces(request, timeout=30)
        except grpc.RpcError as exc:
            raise PoolError(exc.code(), exc.details()) from None
    return call


def _newline_module(msg):
    msg.module = "q_proj\n"


def _empty_factor(msg):
    msg.a.shape[:] = [2, 0]
    msg.a.data = b""


def _many_dims(msg):
    msg.gate.shape[:] = [1] * 72


@pytest.mark.parametrize("mutate, match", [
    (_newline_module, "not an identifier"),
    (_empty_factor, "empty dimension"),
    (_many_dims, "72 dimensions"),
], ids=["module-with-newline", "zero-size-factor", "72-dimensions"])
def test_malformed_wire_pieces_are_invalid_argument_not_unknown(federation, mutate, match):
    refused(federation, grpc.StatusCode.INVALID_ARGUMENT, _raw_submit(federation, mutate),
            match)


def test_pieces_without_pool_consent_are_refused(federation):
    refused(federation, grpc.StatusCode.PERMISSION_DENIED,
            _granted_submit(federation, lambda s: piece(s, seed=40), {"pool": False}),
            "pool = true")


def test_huge_gate_filters_are_refused_at_once(federation):
    refused(federation, grpc.StatusCode.INVALID_ARGUMENT,
            lambda c: c.list_gates(sharers=[f"s{i}" for i in range(100_000)]), "at most 1024")


def test_a_fetch_of_one_id_repeated_is_refused(federation):
    pid = federation["server"].store.piece_ids()[0]

    def call(client):
        try:
            list(client._stub.FetchPieces(pfl_pb2.FetchPiecesRequest(piece_ids=[pid] * 64),
                                          timeout=30))
        except grpc.RpcError as exc:
            raise PoolError(exc.code(), exc.details()) from None
    refused(federation, grpc.StatusCode.INVALID_ARGUMENT, call, "repeated")


def test_a_fetch_beyond_the_byte_cap_is_refused(federation, monkeypatch):
    monkeypatch.setattr(pool_service, "MAX_FETCH_BYTES", 100)  # one tiny piece is ~1 KB
    pid = federation["server"].store.piece_ids()[0]
    refused(federation, grpc.StatusCode.RESOURCE_EXHAUSTED, lambda c: c.fetch([pid]),
            "at most 100")


def test_reads_do_not_wait_for_a_write_in_progress(federation):
    """A submission holds the write lock (e.g. a large batch committing): fetches go on."""
    store = federation["server"].store
    pid = store.piece_ids()[0]
    done = threading.Event()
    with store._lock:  # what a long submission holds
        def fetch():
            with PoolClient(federation["server"].target, federation["certs"]) as client:
                client.fetch([pid])
            done.set()
        worker = threading.Thread(target=fetch)
        worker.start()
        assert done.wait(20), "a fetch waited for the write lock"
    worker.join(10)


def test_a_target_takes_pieces_only_from_the_sharers_the_federation_names(tmp_path):
    """An open pool (development) holds a stranger's pieces, aimed to rank first; a target
    that pins the federation's sharers never sees them."""
    certs = crypto.write_dev_certs(tmp_path / "certs").directory
    honest, stranger = crypto.generate_device_key(), crypto.generate_device_key()
    with PoolServer(PoolStore(tmp_path / "pool"), certs) as server:
        with PoolClient(server.target, certs) as client:
            client.submit([piece(pseudonym(honest), seed=50)], honest, POOL)
            client.submit([piece(pseudonym(stranger), seed=51)], stranger, POOL)
        trusted = trusted_sharers({"pool-sharers": json.dumps(
            {pseudonym(honest): crypto.public_key_bytes(honest).hex()})})
        got = fetch_pool(server.target, certs, ["q_proj"], trusted_keys=trusted,
                         shapes=SHAPES)
        assert {p.sharer for p in got.pool} == {pseudonym(honest)}
        # unfiltered, the stranger's gate reaches the pinned client, which refuses it
        with PoolClient(server.target, certs, trusted_keys=trusted) as client:
            with pytest.raises(crypto.SignatureError, match="not trusted"):
                client.list_gates()
    with pytest.raises(PflError, match="does not match its pseudonym"):
        trusted_sharers({"pool-sharers": json.dumps(
            {pseudonym(honest): crypto.public_key_bytes(stranger).hex()})})


def test_orphan_blobs_left_by_a_kill_are_swept(tmp_path):
    store = PoolStore(tmp_path / "pool")
    orphan = store.blob_path("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left behind by a killed submission")
    assert store.sweep_orphans(min_age_seconds=3600) == 0  # young: maybe still in flight
    assert store.sweep_orphans(min_age_seconds=0) == 1 and not orphan.exists()
    store.close()


# ========================================================== a fake server, a real device
@pytest.fixture
def device(tmp_path, tiny):
    """A device's real ClientApp with its own node config; returns (grid, ledger path)."""
    ledger = tmp_path / "device" / "ledger.jsonl"
    config = {"ledger": str(ledger), "state-dir": str(tmp_path / "device")}
    return config, ledger


def _send(node_config: dict, message_type: str, config: dict, arrays=None) -> Message:
    grid = LocalGrid(make_client_app(), 1, node_config=node_config)
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    (reply,) = grid.send_and_receive([grid.create_message(content, message_type, 1001,
                                                          group_id="attack")])
    return reply


def _lora_arrays():
    from cloud_server.server_app import initial_arrays

    return initial_arrays("lora", "tiny", 0)


def test_the_server_cannot_widen_a_devices_consent(device, tmp_path):
    """The device names no policy (so the defaults hold: no pieces leave); the server's
    message names one that shares everything. The device keeps its defaults."""
    config, ledger = device
    permissive = tmp_path / "permissive.toml"
    permissive.write_text("version = 1\n[upload]\nperpcs_pieces = true\n[sharing]\n"
                          "ratio = 1.0\nmodules = \"all\"\n")
    reply = _send({**config, "pool-ca": str(tmp_path / "ca.pem")}, "train.share",
                  {"model": "tiny", "consent-policy": str(permissive),
                   "pool-address": "127.0.0.1:9"}, _lora_arrays())
    assert reply.has_error() and reply.error.code == CONSENT_DENIED
    (entry,) = read_entries(ledger)  # the refusal, audited; nothing else left
    assert entry["arrays"] == [] and entry["fields"]["error"]["code"] == CONSENT_DENIED
    strict = tmp_path / "strict.toml"  # and a device's own "no" holds against the server
    strict.write_text("version = 1\n[upload]\nstage1_lora = false\n")
    reply = _send({**config, "consent-policy": str(strict)}, "train",
                  {"method": "lora", "model": "tiny", "consent-policy": str(permissive)},
                  _lora_arrays())
    assert reply.has_error() and reply.error.code == CONSENT_DENIED


def test_the_server_cannot_choose_the_pool_ca_a_device_trusts(device, tmp_path):
    config, ledger = device
    share_policy = tmp_path / "share.toml"
    share_policy.write_text("version = 1\n[upload]\nperpcs_pieces = true\n")
    reply = _send({**config, "consent-policy": str(share_policy)}, "train.share",
                  {"model": "tiny", "pool-address": "127.0.0.1:9",
                   "pool-ca": str(tmp_path / "attacker-ca.pem")}, _lora_arrays())
    assert reply.has_error() and reply.error.code == NOT_CONFIGURED
    assert [e["channel"] for e in read_entries(ledger)] == ["flower"]  # no pool call made


def test_the_server_cannot_move_a_devices_ledger_or_state(device, tmp_path):
    config, ledger = device
    elsewhere = tmp_path / "attacker"
    reply = _send(config, "train", {"method": "lora", "model": "tiny", "max-steps": 1,
                                    "num-users-per-client": 1, "ledger": str(elsewhere / "l"),
                                    "run-dir": str(elsewhere), "state-dir": str(elsewhere)},
                  _lora_arrays())
    assert reply.has_content()  # it trained, and wrote only where the device said
    assert len(read_entries(ledger)) == 1 and not elsewhere.exists()


def test_a_malformed_consent_file_leaves_as_a_code_and_is_audited(device, tmp_path):
    config, ledger = device
    broken = tmp_path / "broken.toml"
    broken.write_text(f"version = 1\n[upload\n# {SECRET}\n")
    reply = _send({**config, "consent-policy": str(broken)}, "train",
                  {"method": "lora", "model": "tiny"}, _lora_arrays())
    assert reply.has_error() and reply.error.code == FAILED
    assert SECRET not in reply.error.reason and reply.error.reason.endswith(DEVICE_ERRORS[FAILED])
    assert SECRET not in ledger.read_text() and len(read_entries(ledger)) == 1


def test_a_devices_errors_never_quote_what_the_server_sent(device):
    config, ledger = device
    reply = _send(config, "train", {"method": f"lora; {SECRET}", "model": "tiny"},
                  _lora_arrays())
    assert reply.has_error() and reply.error.code == BAD_REQUEST
    assert SECRET not in reply.error.reason and SECRET not in ledger.read_text()


def test_a_device_with_no_ledger_sends_nothing_but_a_code(tmp_path, tiny):
    reply = _send({}, "train", {"method": "lora", "model": "tiny", "max-steps": 1,
                                "run-dir": str(tmp_path)}, _lora_arrays())
    assert reply.has_error() and reply.error.code == NOT_CONFIGURED
    assert not list(tmp_path.rglob("*.jsonl"))


def test_evaluation_statistics_keys_do_not_name_the_users_labels():
    task = news_category(("health", "politics", "sports"))
    a = metric_stats(task, ["politics"], ["health"])
    b = metric_stats(task, ["sports"], ["sports"])
    assert set(a) == set(b)  # the same keys, whatever the user's gold labels are
    assert check_stats(task, a) is None
    assert "n = 1e+300" in check_stats(task, {**a, "n": 1e300})
    assert "not a finite" in check_stats(task, {**a, "correct": float("nan")})
    assert "keys differ" in check_stats(task, {**a, "tp.health": 1.0})


# ============================================================ fake clients against FedAvg
GLOBAL = {"w": np.full((4, 8), 0.5, np.float32), "b": np.zeros(8, np.float32)}


def honest(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def test_one_client_claiming_1e300_examples_does_not_take_over():
    evil = {k: np.full_like(v, 3.0) for k, v in GLOBAL.items()}  # within the update bound? no
    near = {k: v + np.float32(0.05) for k, v in GLOBAL.items()}  # a legal-size update
    replies = [Reply(honest(i), 10, f"h{i}") for i in range(3)] + [Reply(near, 1e300, "evil")]
    result = fedavg(replies, GLOBAL, max_examples=20)
    weights = {r.node: r.num_examples for r in result.accepted}
    assert weights["evil"] == 20  # capped, not 1e300
    share = 20 / (30 + 20)
    moved = float(np.abs(result.arrays["w"] - GLOBAL["w"]).max())
    assert moved <= share * 0.05 + 0.05  # at most its capped share of a bounded update
    assert fedavg([Reply(evil, 10, "evil")], GLOBAL).arrays is None  # beyond the bound


def test_two_clients_at_1e308_do_not_zero_the_model():
    replies = [Reply(honest(1), 1e308, "a"), Reply(honest(2), 1e308, "b")]
    result = fedavg(replies, GLOBAL, max_examples=1000)
    assert result.arrays is not None and np.isfinite(result.arrays["w"]).all()
    assert abs(float(result.arrays["w"].mean()) - 0.5) < 0.05  # not all zeros


def test_an_update_of_norm_1e4_is_dropped_and_outliers_are_clipped():
    big = {k: v + np.float32(1e4 / np.sqrt(40)) for k, v in GLOBAL.items()}
    result = fedavg([Reply(honest(i), 10, f"h{i}") for i in range(3)] + [Reply(big, 10, "x")],
                    GLOBAL)
    assert [n for n, _ in result.dropped] == ["x"] and "update norm" in result.dropped[0][1]
    loud = {k: v + np.float32(0.5) for k, v in GLOBAL.items()}  # legal, but 50x the others
    result = fedavg([Reply(honest(i), 10, f"h{i}") for i in range(3)] + [Reply(loud, 10, "l")],
                    GLOBAL)
    assert float(np.abs(result.arrays["w"] - GLOBAL["w"]).max()) < 0.05  # clipped to 3x median


def test_non_finite_metrics_are_left_out_of_the_average():
    replies = [Reply(honest(0), 10, "a", {"train-loss": 1.0}),
               Reply(honest(1), 10, "b", {"train-loss": float("inf")})]
    assert average_metrics(replies) == {"train-loss": 1.0}


# ================================================================= the device's own files
def test_a_reserialized_ledger_line_is_caught_and_an_empty_ledger_warned(tmp_path):
    ledger = AuditLedger(tmp_path / "ledger.jsonl")
    ledger.append("flower", "server", "train", {"w": np.ones(3, np.float32)}, "upload.x")
    line = ledger.path.read_text()
    ledger.path.write_text(json.dumps(json.loads(line), indent=None) + "\n")  # same meaning
    result = verify(ledger.path)
    assert not result.ok and "canonical" in result.message
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = verify(empty)
    assert result.ok and result.warning and "empty" in result.warning


@pytest.mark.parametrize("text, match", [
    (b"version = true\n", "version must be 1"),
    (b"version = 1\n[upload]\nstage1_lora = \xff\n", "not UTF-8"),
])
def test_consent_files_that_only_look_valid_are_refused(tmp_path, text, match):
    path = tmp_path / "consent.toml"
    path.write_bytes(text)
    with pytest.raises(PflError, match=match):
        ConsentPolicy.load(path)


def test_a_consent_policy_for_layers_the_model_lacks_is_refused(tmp_path):
    path = tmp_path / "consent.toml"
    path.write_text("version = 1\n[upload]\nperpcs_pieces = true\n[sharing]\nlayers = [2, 99]\n")
    with pytest.raises(PflError, match="layer 99"):
        ConsentPolicy.load(path).check_model(4)


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe\x00 not text\n", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b"", "no articles"),
], ids=["non-utf8", "deeply-nested", "empty"])
def test_hostile_huffpost_files_give_a_clear_error(tmp_path, content, match):
    from shared.data import load_dataset

    path = tmp_path / "News_Category_Dataset_v3.jsonl"
    path.write_bytes(content)
    with pytest.raises(PflError, match=match):
        load_dataset("news-category", str(path))


def test_a_deeply_nested_lamp_file_gives_a_clear_error(tmp_path):
    from shared.data import load_dataset

    path = tmp_path / "dev_questions.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(PflError, match="nested too deeply"):
        load_dataset("LaMP-3", str(path))


def test_pfl_eval_on_data_with_no_eligible_user_is_a_clear_error(tmp_path, capsys):
    from simulations.cli import main

    rows = [{"headline": "h", "category": "x", "short_description": "d", "authors": "A",
             "date": f"2020-01-0{day}", "link": ""} for day in (1, 2, 3)]
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["eval", "--task", "news-headline", "--data", str(path), "--model", "tiny",
                 "--methods", "nonpersonalized"])
    assert code == 2 and "no user in the data has enough history" in capsys.readouterr().err


# ------------------------------------------------- idle streams and floods (the services)
def _held_streams(target: str, ca: bytes, method: str, connections: int, per: int,
                  release: threading.Event):
    """``connections`` x ``per`` calls that open their stream (headers) and never send the
    request, as a slow-loris client does; (channels, futures)."""
    def nothing():
        release.wait(60)  # bounded: the test releases it, or it gives up
        return
        yield  # a generator that yields nothing

    channels, calls = [], []
    for _ in range(connections):
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
        call = channel.stream_unary(method, request_serializer=None,
                                    response_deserializer=None)
        channels.append(channel)
        calls += [call.future(nothing(), timeout=60) for _ in range(per)]
    return channels, calls


def test_idle_streams_neither_stall_the_pool_nor_hold_it_for_long(tmp_path):
    """24 streams that send headers and then nothing, on 3 connections (the pool has 8
    workers): an honest call is still answered, and the idle calls are ended after the
    request deadline (before: 8 such streams froze the pool until they closed)."""
    from cloud_server.rpc import Admission

    certs = crypto.write_dev_certs(tmp_path / "certs").directory
    server = PoolServer(PoolStore(tmp_path / "pool"), certs, own_store=True,
                        admission=Admission(request_timeout=2.0))
    release = threading.Event()
    ca = (certs / "ca.pem").read_bytes()
    channels, held = _held_streams(server.target, ca, "/pfl.v1.PiecePool/SubmitPieces", 3, 8,
                                   release)
    try:
        time.sleep(0.5)  # the held streams are open on the server
        with PoolClient(server.target, certs, timeout=10) as honest:
            assert honest.list_gates() == []  # answered, not DEADLINE_EXCEEDED
        started = time.monotonic()
        codes = set()
        for call in held:
            try:
                call.result(timeout=30)
            except grpc.RpcError as exc:
                codes.add(exc.code())
        assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}, codes
        assert time.monotonic() - started < 25  # ended by the server, not by their own end
    finally:
        release.set()
        for channel in channels:
            channel.close()
        server.stop(grace=0)


def test_a_flooding_connection_beside_idle_streams_leaves_others_answered(tmp_path):
    """8 idle streams and a connection with 40 calls in flight against a pool of 8
    workers: another connection's call is answered, and every flooding call is answered or
    refused with RESOURCE_EXHAUSTED (past its connection's share), none hangs."""
    certs = crypto.write_dev_certs(tmp_path / "certs").directory
    server = PoolServer(PoolStore(tmp_path / "pool"), certs, own_store=True)
    release = threading.Event()
    ca = (certs / "ca.pem").read_bytes()
    channels, held = _held_streams(server.target, ca, "/pfl.v1.PiecePool/SubmitPieces", 1, 8,
                                   release)  # keeps 8 of this connection's calls open
    try:
        flood = grpc.secure_channel(server.target, grpc.ssl_channel_credentials(ca))
        gates = flood.unary_stream("/pfl.v1.PiecePool/ListGates",
                                   request_serializer=pfl_pb2.ListGatesRequest.SerializeToString,
                                   response_deserializer=pfl_pb2.GateEntry.FromString)
        with PoolClient(server.target, certs, timeout=10) as honest:
            streams = [gates(pfl_pb2.ListGatesRequest(), timeout=20) for _ in range(40)]
            assert honest.list_gates() == []
        codes = []
        for stream in streams:
            try:
                list(stream)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.OK) >= 16
        flood.close()
    finally:
        release.set()
        for channel in channels:
            channel.close()
        server.stop(grace=0)


def test_the_batcher_takes_clients_in_turn():
    """One client's backlog of 40 queued requests does not keep another client's request
    out of the next batch of 32, nor fill that batch (two clients waiting: at most 16 rows
    each); each client's own requests keep their order; a client alone fills a batch."""
    from concurrent.futures import Future

    from cloud_server.inference_service import Batcher, ServeLimits, _Job

    batcher = Batcher(None, ServeLimits(max_batch=32))
    try:
        with batcher.cond:
            flood = [_Job([1], None, 4, 0, "flood", Future(), 0.0) for _ in range(40)]
            other = _Job([2], None, 4, 0, "honest", Future(), 0.0)
            batcher.queue.extend(flood + [other])
            batch = batcher._fair_batch(32)
            left = list(batcher.queue)
            alone = batcher._fair_batch(32)
        assert other in batch and len(batch) == 17
        assert [j for j in batch if j.client == "flood"] == flood[:16]
        assert left == flood[16:]
        assert alone == flood[16:]  # the flooder alone: the rest in one batch
    finally:
        batcher.close()


def test_hostile_files_and_settings_give_one_line_errors(tmp_path, capsys):
    """Results or recipe files nested past the parser, a results file whose metrics are a
    string, and training settings that cannot train: `pfl: error:` lines, no traceback."""
    from shared.training import TrainConfig
    from simulations import cli

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    stringy = tmp_path / "stringy.json"
    stringy.write_text(json.dumps({"task": "synthetic", "methods": {"oppu": {"metrics": "x"}}}))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"task": "synthetic", "methods": {}}))
    for args in (["claims", str(stringy)], ["claims", str(deep)], ["compare", str(deep)],
                 ["claims", str(empty), "--also", str(deep)],
                 ["eval", "--task", "synthetic", "--model", "tiny", "--users", "2",
                  "--recipe", str(deep)]):
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("pfl: error:") and "Traceback" not in err, args
    for bad in ({"lr": float("nan")}, {"lr": -1.0}, {"lr": "x"}, {"batch_size": 0},
                {"epochs": float("inf")}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# ------------------------------------------------------------ pfl serve: who is asking
def _adapter(shapes: dict, seed: int, rank: int = 2) -> list[Piece]:
    """A personal LoRA on the first two (layer, module)s of the served model."""
    generator = torch.Generator().manual_seed(seed)
    return [Piece("user", layer, module, torch.randn(rank, d_in, generator=generator) * 0.1,
                  torch.randn(d_out, rank, generator=generator) * 0.1, 2.0)
            for (layer, module), (d_out, d_in) in sorted(shapes.items())[:2]]


def _adapter_bytes(pieces) -> int:
    return sum(4 * (p.A.numel() + p.B.numel()) for p in pieces)


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """`pfl serve` on the tiny model (raw base, no pool), an adapter cache that holds four
    of these adapters and one client's quota two; and a second one that admits one key."""
    from cloud_server.inference_service import ServeLimits, start_inference_server
    from shared.serving.rows import module_shapes

    root = tmp_path_factory.mktemp("serve-auth")
    certs = crypto.write_dev_certs(root / "certs").directory
    shapes = module_shapes(tiny.model, ("q_proj", "v_proj"))
    mb = _adapter_bytes(_adapter(shapes, 0)) / (1 << 20)
    limits = ServeLimits(max_wait_ms=1, max_new_tokens=8, default_new_tokens=4,
                         adapter_cache_mb=4.5 * mb, adapter_quota_mb=2.5 * mb)
    member = crypto.generate_device_key()

    def copy_of_tiny():  # each engine wraps its own copy: the shared fixture stays as it is
        import copy

        from shared.models import LoadedModel

        return LoadedModel("tiny", copy.deepcopy(tiny.model), tiny.tokenizer, tiny.device)

    server = start_inference_server(certs, loaded=copy_of_tiny(), limits=limits)
    closed = start_inference_server(certs, loaded=copy_of_tiny(), limits=limits,
                                    clients=frozenset({crypto.public_key_bytes(member)}))
    yield {"server": server, "closed": closed, "certs": certs, "shapes": shapes,
           "member": member}
    for running in (server, closed):
        running.stop(grace=0)
        running.engine.close()


def _serve_client(served, key=None, which="server"):
    from edge_client.inference_client import InferenceClient

    return InferenceClient(served[which].target, served["certs"], key=key, timeout=30)


def test_unsigned_forged_altered_replayed_and_stale_calls_to_serve_are_refused(served):
    from edge_client.inference_client import InferenceError

    key, other = crypto.generate_device_key(), crypto.generate_device_key()
    with _serve_client(served, key) as client:
        request = client.request("hello there", max_new_tokens=2)
        body = request.SerializeToString(deterministic=True)

        def send(metadata, message=request):
            with pytest.raises(grpc.RpcError) as caught:
                client._stub.Generate(message, timeout=30, metadata=metadata)
            return caught.value.code(), caught.value.details()

        assert send(())[0] == grpc.StatusCode.UNAUTHENTICATED  # unsigned
        # another key's public half beside this key's signature
        signed = dict(crypto.sign_request(key, "Generate", body))
        signed[crypto.REQUEST_KEY] = crypto.public_key_bytes(other)
        assert send(tuple(signed.items()))[0] == grpc.StatusCode.UNAUTHENTICATED
        # the body changed after signing (a longer answer asked for)
        longer = client.request("hello there", max_new_tokens=8)
        assert send(crypto.sign_request(key, "Generate", body), longer)[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        # signed for UploadAdapter, sent to Generate
        assert send(crypto.sign_request(key, "UploadAdapter", body))[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        # an hour old
        stale = crypto.sign_request(key, "Generate", body, time_ms=(time.time() - 3600) * 1000)
        code, details = send(stale)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "clock" in details
        # the same signed call twice: answered once
        once = crypto.sign_request(key, "Generate", body)
        assert client._stub.Generate(request, timeout=30, metadata=once).new_tokens >= 1
        code, details = send(once)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in details
        # and the signed client itself is answered
        assert client.generate("hello there", max_new_tokens=2) is not None
    with _serve_client(served, key, which="closed") as stranger:
        with pytest.raises(InferenceError) as caught:
            stranger.generate("hello there", max_new_tokens=2)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    with _serve_client(served, served["member"], which="closed") as member:
        assert member.generate("hello there", max_new_tokens=2) is not None


def test_an_adapter_is_usable_only_by_the_key_that_uploaded_it(served):
    """The adapter id (what the device's ledger keeps) is not a credential: another key gets
    NOT_FOUND with it, and uploading the same adapter tells it nothing (created=True)."""
    from edge_client.inference_client import InferenceError
    from shared.methods.oppu.wire import adapter_to_proto

    pieces = _adapter(served["shapes"], 1)
    with _serve_client(served) as owner, _serve_client(served) as stranger:
        first = owner._call("UploadAdapter", adapter_to_proto(pieces))
        assert first.created
        assert not owner._call("UploadAdapter", adapter_to_proto(pieces)).created
        mine = owner.generate("hello there", adapter=first.adapter_id, max_new_tokens=4)
        with pytest.raises(InferenceError) as caught:
            stranger.generate("hello there", adapter=first.adapter_id, max_new_tokens=4)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        # the stranger's own upload of the same content: new to it, no oracle of the owner's
        assert stranger._call("UploadAdapter", adapter_to_proto(pieces)).created
        assert stranger.generate("hello there", adapter=first.adapter_id,
                                 max_new_tokens=4) == mine


def test_a_stranger_evicts_only_its_own_adapters_and_an_owner_uploads_again(served):
    """One key uploading ten adapters into a cache of four (quota two) evicts only its own;
    when many keys do push an owner's adapter out, the owner's client uploads it again on
    NOT_FOUND and answers as before."""
    cache = served["server"].personalizer.adapters
    owner_pieces = _adapter(served["shapes"], 2)
    with _serve_client(served) as owner:
        before = owner.answer("hello there", {"adapter_pieces": owner_pieces},
                              max_new_tokens=4)
        ident = next(iter(owner._uploaded))
        owner_key = crypto.public_key_bytes(owner.key)
        with _serve_client(served) as stranger:
            for seed in range(100, 110):
                stranger.upload(_adapter(served["shapes"], seed))
        assert cache.get(owner_key, ident) is not None
        assert max(cache.usage.values()) <= cache.quota
        # four keys with two adapters each: more than the whole cache holds
        for k in range(4):
            with _serve_client(served) as other:
                for seed in range(200 + 10 * k, 202 + 10 * k):
                    other.upload(_adapter(served["shapes"], seed))
        assert cache.get(owner_key, ident) is None and cache.size <= cache.capacity
        again = owner.answer("hello there", {"adapter_pieces": owner_pieces},
                             max_new_tokens=4)
        assert again == before and cache.get(owner_key, ident) is not None


def test_device_key_prints_a_key_that_serve_clients_reads(tmp_path, capsys):
    from simulations import cli

    assert cli.main(["device-key", str(tmp_path / "device.key")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    key = crypto.load_device_key(tmp_path / "device.key")
    assert bytes.fromhex(line) == crypto.public_key_bytes(key)
    (tmp_path / "clients.txt").write_text(f"# devices\n{line}\n\n")
    assert crypto.read_public_keys(tmp_path / "clients.txt") == {bytes.fromhex(line)}
    (tmp_path / "bad.txt").write_text(f"{line}\nnot-a-key\n")
    with pytest.raises(PflError, match="bad.txt:2"):
        crypto.read_public_keys(tmp_path / "bad.txt")
