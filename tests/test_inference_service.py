"""The inference service over real gRPC with TLS on 127.0.0.1: requests with every kind of
personalization, from many clients at once, get the answers the device's own rows give, and
hostile requests get a status and change nothing."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from cloud_server.inference_service import ServeLimits, start_inference_server
from cloud_server.pool_store import PoolStore
from edge_client.inference_client import InferenceClient, InferenceError
from shared import crypto
from shared.files import save_npz
from shared.methods.oppu.config import personal_lora
from shared.methods.perfit.core import perfit_to_arrays
from shared.methods.perpcs.recipe import Recipe
from shared.models import LoadedModel
from shared.prompts import encode_prompt
from shared.serialization import SignedPiece
from shared.serving.engine import BatchedEngine
from shared.serving.rows import lora_state_pieces

METHODS = ("lora-c", "oppu", "perpcs", "perfit")
NEW = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tiny, small_world, tmp_path_factory):
    """Personal states of two targets for each method (tiny model), the federation's arrays,
    a real pool holding the sharers' pieces, and a running service on a float64 copy."""
    root = tmp_path_factory.mktemp("serve")
    runtime, roles, states = small_world
    # what the federation leaves: the collective arrays, and a pool of signed pieces
    arrays = {f"lora.{k}": v.numpy() for k, v in runtime.cache.stage1_state.items()}
    arrays.update({f"perfit.{k}": v for k, v in
                   perfit_to_arrays(*runtime.cache.perfit_stage1).items()})
    save_npz(root / "global_arrays.npz", arrays)
    store = PoolStore(root / "pool")
    pool = runtime.cache.perpcs_pool
    for sharer, pieces in pool.adapters.items():
        key = crypto.generate_device_key()
        store.submit([SignedPiece.sign(p, key, {"pool": True}) for p in pieces])
    store.close()
    certs = crypto.write_dev_certs(root / "certs").directory
    model64 = copy.deepcopy(tiny.model).double().eval()
    loaded64 = LoadedModel("tiny64", model64, tiny.tokenizer, tiny.device)
    limits = ServeLimits(max_wait_ms=50, max_per_client=4, max_prompt_tokens=300,
                         max_new_tokens=16, default_new_tokens=8)
    server = start_inference_server(certs, loaded=loaded64, arrays=root / "global_arrays.npz",
                                    pool_db=root / "pool", limits=limits)
    prompts = [q.input for u in roles["targets"] for q in u.queries]
    yield {"runtime": runtime, "states": states, "server": server, "certs": certs,
           "prompts": prompts, "tokenizer": tiny.tokenizer, "tiny": tiny,
           "targets": roles["targets"]}
    server.stop()
    server.engine.close()
    server.store.close()


def _client(setup, **kwargs):
    return InferenceClient(setup["server"].target, setup["certs"], **kwargs)


def _personalization(setup, client, name, uid):
    """What a device sends for ``name``: nothing, its recipe, its stage 2, or its adapter."""
    core, state = setup["states"][(name, uid)]
    if name == "perpcs":
        return {"recipe": state.payload}
    if name == "perfit":
        return {"perfit": state.payload}
    if name == "oppu":
        spec = personal_lora()
        return {"adapter": client.upload(lora_state_pieces(state.payload,
                                                           spec.alpha / spec.r))}
    return {}


def _expected(setup, requests):
    """The device-side answers: each method's own serving row on a separate float64 copy."""
    model64 = copy.deepcopy(setup["tiny"].model).double().eval()
    runtime = setup["runtime"]
    with BatchedEngine(model64, setup["tokenizer"]) as engine:
        out = []
        for name, uid, prompt in requests:
            core, state = setup["states"][(name, uid)]
            row = core.serving_adapter(runtime, state)
            ids = encode_prompt(setup["tokenizer"], prompt)
            tokens = engine.generate([ids], [row], max_new_tokens=NEW, min_new_tokens=NEW)[0]
            out.append(setup["tokenizer"].decode(tokens, skip_special_tokens=True).strip())
    return out


def test_remote_answers_equal_the_devices_own_for_every_method_from_concurrent_clients(setup):
    # every (method, user) on one shared prompt and on a prompt of its own: 16 requests,
    # 32 in all, from 8 concurrent clients
    combos = [(n, u.id) for n in METHODS for u in setup["targets"]]
    requests = [(n, uid, setup["prompts"][0]) for n, uid in combos] + \
        [(n, uid, setup["prompts"][1 + i % (len(setup["prompts"]) - 1)])
         for i, (n, uid) in enumerate(combos)]
    requests = requests * 2
    expected = _expected(setup, requests)
    barrier = threading.Barrier(8)
    rows_seen = []

    def ask(chunk):
        with _client(setup) as client:
            out = []
            barrier.wait(timeout=60)
            for name, uid, prompt in chunk:
                kwargs = _personalization(setup, client, name, uid)
                out.append(client.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW,
                                          **kwargs))
                rows_seen.append(client.last_reply.batch_rows)
            return out

    chunks = [requests[i::8] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, chunks))
    got = {}
    for chunk, outs in zip(chunks, answers):
        for request, text in zip(chunk, outs):
            got.setdefault(request, []).append(text)
    for request, text in zip(requests, expected):
        assert set(got[request]) == {text}, request
    assert max(rows_seen) > 1  # requests from different clients shared batches
    shared_prompt = {text for (_, _, prompt), text in zip(requests, expected)
                     if prompt == setup["prompts"][0]}
    assert all(expected) and len(shared_prompt) > 1  # the personalization changes answers


def test_hostile_requests_get_a_status_and_change_nothing(setup):
    prompt = setup["prompts"][0]
    uid = setup["targets"][0].id
    with _client(setup) as client:
        good = _personalization(setup, client, "perpcs", uid)
        before = client.generate(prompt, max_new_tokens=NEW, **good)

        def status(**kwargs) -> grpc.StatusCode:
            with pytest.raises(InferenceError) as caught:
                client.generate(prompt, max_new_tokens=NEW, **kwargs)
            return caught.value.code

        recipe = good["recipe"]
        unknown = Recipe({key: [("f" * 64, 1.0)] for key in list(recipe.entries)[:1]})
        assert status(recipe=unknown) == grpc.StatusCode.NOT_FOUND
        # a recipe of another pool: real pieces' ids this pool never saw
        other = Recipe({key: [(pid[::-1], w) for pid, w in items]
                        for key, items in recipe.entries.items()})
        assert status(recipe=other) == grpc.StatusCode.NOT_FOUND
        assert status(adapter="0" * 64) == grpc.StatusCode.NOT_FOUND
        # a weight that overflows the assembly, a config nested past the parser: refused
        for hostile in ("weight", "config"):
            params = client.request(prompt, recipe=recipe)
            if hostile == "weight":
                params.perpcs.entries[0].items[0].weight = 1e38
            else:
                params.perpcs.config_json = "[" * 50_000 + "]" * 50_000
            with pytest.raises(InferenceError) as caught:
                client._call("Generate", params)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, hostile

        perfit = setup["states"][("perfit", uid)][1].payload
        params = client.request(prompt, perfit=perfit)
        params.perfit.layers[0].w.data = np.full(
            len(params.perfit.layers[0].w.data) // 4, np.nan, "<f4").tobytes()
        import hashlib
        params.perfit.layers[0].w.sha256 = hashlib.sha256(params.perfit.layers[0].w.data).hexdigest()
        with pytest.raises(InferenceError) as caught:
            client._call("Generate", params)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "non-finite" in caught.value.details

        # an adapter for another model: a width this model does not have
        spec = personal_lora()
        pieces = lora_state_pieces(setup["states"][("oppu", uid)][1].payload,
                                   spec.alpha / spec.r)
        from shared.methods.perpcs.pieces import Piece
        wide = [Piece("x", p.layer, p.module, torch.zeros(p.rank, p.d_in + 1),
                      p.B, p.scaling) for p in pieces[:1]]
        with pytest.raises(InferenceError) as caught:
            client.upload(wide)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        nowhere = [Piece("x", 999, "q_proj", p.A, p.B, p.scaling) for p in pieces[:1]]
        with pytest.raises(InferenceError) as caught:
            client.upload(nowhere)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

        with pytest.raises(InferenceError) as caught:
            client.generate("word " * 400, max_new_tokens=NEW)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in \
            caught.value.details
        with pytest.raises(InferenceError) as caught:
            client.generate(prompt, max_new_tokens=17)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

        assert client.generate(prompt, max_new_tokens=NEW, **good) == before


def test_a_flood_from_one_client_is_refused_beyond_its_limit_and_others_are_served(setup):
    prompt = setup["prompts"][1]
    with _client(setup) as client:
        expected = client.generate(prompt, max_new_tokens=NEW)

        def one(_):
            try:
                return client.generate(prompt, max_new_tokens=NEW)
            except InferenceError as exc:
                return exc.code

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(48)))
    refused = [r for r in results if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
    answered = [r for r in results if isinstance(r, str)]
    assert refused and answered and len(refused) + len(answered) == 48
    assert set(answered) == {expected}
    with _client(setup) as client:
        assert client.generate(prompt, max_new_tokens=NEW) == expected


def test_pfl_generate_answers_the_same_locally_and_remotely_under_consent(setup, tmp_path,
                                                                          capsys):
    """A device's saved state answered by `pfl generate` on the device (PyTorch, and ONNX
    Runtime with --backend onnx) and with --remote: the same text for every method. Remote needs inference.remote (and the upload rule of what
    it sends); each request is a ledger entry with the rule and the prompt's sha256."""
    import hashlib
    import json

    from cloud_server.pool_service import start_pool_server
    from edge_client.audit import AuditLedger
    from simulations.cli import main

    root = setup["server"].store.directory.parent
    uid = setup["targets"][0].id
    state_dir = tmp_path / "device"
    for name in METHODS:
        core, state = setup["states"][(name, uid)]
        core.save(state, state_dir / "personal" / name)
    consent = tmp_path / "consent.toml"
    consent.write_text("version = 1\n[inference]\nremote = true\n[upload]\n"
                       "perfit_stage2 = true\noppu_personal_lora = true\n")
    tiny32 = LoadedModel("tiny", copy.deepcopy(setup["tiny"].model), setup["tokenizer"],
                         torch.device("cpu"))
    server = start_inference_server(setup["certs"], loaded=tiny32,
                                    arrays=root / "global_arrays.npz", pool_db=root / "pool")
    pool = start_pool_server(root / "pool", setup["certs"], open_enrolment=True)
    query = "a pair of waterproof hiking boots, bought on sale"
    common = ["generate", "--model", "tiny", "--prompt", query, "--state", str(state_dir),
              "--arrays", str(root / "global_arrays.npz"), "--pool", pool.target,
              "--ca", str(setup["certs"]), "--max-new-tokens", "6"]
    try:
        answers = {}
        for name in METHODS:
            for where in ("local", "remote", "onnx"):
                extra = {"local": [], "onnx": ["--backend", "onnx"],  # ONNX Runtime locally
                         "remote": ["--remote", server.target, "--consent", str(consent)]}
                assert main(common + ["--method", name] + extra[where]) == 0, \
                    capsys.readouterr().err
                answers[(name, where)] = capsys.readouterr().out.strip()
            assert answers[(name, "local")] == answers[(name, "remote")] == \
                answers[(name, "onnx")], name
        denied = main(common + ["--method", "perfit", "--remote", server.target])
        err = capsys.readouterr().err
    finally:
        pool.stop()
        server.stop()
        server.engine.close()
        server.store.close()
    assert denied == 2 and "inference.remote" in err
    entries = AuditLedger(state_dir / "ledger.jsonl").entries()
    generates = [e for e in entries if e["message_type"].endswith("/Generate")]
    uploads = [e for e in entries if e["message_type"].endswith("/UploadAdapter")]
    assert len(generates) == len(METHODS) and len(uploads) == 1  # the denied one is absent
    from shared.prompts import build_prompt
    digest = hashlib.sha256(build_prompt(query, task=setup["runtime"].task).encode()).hexdigest()
    assert all(e["meta"]["prompt_sha256"] == digest and
               e["consent_rule"].startswith("inference.remote") for e in generates)
    assert uploads[0]["consent_rule"] == "inference.remote+upload.oppu_personal_lora"
    perfit = next(e for e in generates if "upload.perfit_stage2" in e["consent_rule"])
    assert perfit["arrays"] and query not in json.dumps(entries)  # no raw text in the ledger
    # the device key that signs every call leaves with it: each entry names it
    signer = crypto.public_key_bytes(crypto.load_device_key(state_dir / "device.key")).hex()
    assert all(e["meta"]["signed_by"] == signer for e in generates + uploads)


def test_a_devices_evaluation_scores_the_same_locally_through_the_service_and_on_onnx(
        setup, tmp_path, monkeypatch):
    """The evaluation phase of a device, with its own model (PyTorch), through the inference
    service (every query remote) and with ONNX Runtime on the exported graph (``pfl
    generate --backend onnx``'s path): the same answers and statistics for every method."""
    from edge_client.phases import evaluate

    uid = setup["targets"][0].id
    user = setup["targets"][0]
    state_dir = tmp_path / "device"
    for name in METHODS:
        core, state = setup["states"][(name, uid)]
        core.save(state, state_dir / "personal" / name)
    root = setup["server"].store.directory.parent
    with np.load(root / "global_arrays.npz") as data:
        arrays = {k: data[k] for k in data.files}
    model64 = setup["server"].engine.model  # the service's own float64 weights, not in use now
    loaded64 = LoadedModel("tiny64", copy.deepcopy(model64).cpu(), setup["tokenizer"],
                           torch.device("cpu"))  # on the CPU: the ONNX export needs it

    class LocalPool:  # the pool as a device reads it, from the same store
        def __init__(self, store):
            self.store = store

        def gates(self, modules):
            return self.store.list_gates(modules=modules)

        def fetch(self, ids):
            return {pid: self.store.piece(pid) for pid in ids}

    pool = LocalPool(setup["server"].store)
    task = setup["runtime"].task
    from edge_client import phases

    answers = []
    real = phases.metric_stats
    monkeypatch.setattr(phases, "metric_stats", lambda task, predictions, golds: (
        answers.append(list(predictions)), real(task, predictions, golds))[1])
    local = evaluate(loaded64, task, user, list(METHODS), {}, arrays, state_dir, pool=pool)
    with _client(setup) as client:
        remote = evaluate(loaded64, task, user, list(METHODS), {}, arrays, state_dir,
                          pool=pool, remote=client)
        cache = tmp_path / "cache"
        monkeypatch.setenv("PFL_CACHE_DIR", str(cache))  # the export goes here
        onnx = evaluate(loaded64, task, user, list(METHODS), {}, arrays, state_dir,
                        pool=pool, backend="onnx")
    assert list(cache.glob("onnx/tiny64-*/model.onnx"))
    assert local == remote == onnx
    n = len(METHODS)
    assert answers[:n] == answers[n:2 * n] == answers[2 * n:]
    assert len({tuple(a) for a in answers[:n]}) > 1


def test_pfl_serve_runs_as_a_process_answers_and_stops_on_sigterm(setup, tmp_path):
    """`pfl serve` as its own process (tiny model, the federation's arrays and pool): it says
    where it listens, answers a device over TLS, and stops cleanly on SIGTERM."""
    import os
    import re
    import selectors
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = setup["server"].store.directory.parent
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "serve", "--model", "tiny", "--port", "0",
         "--certs", str(setup["certs"]), "--arrays", str(root / "global_arrays.npz"),
         "--pool-db", str(root / "pool")], cwd=repo, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines, target = [], None
    try:
        deadline = time.monotonic() + 120
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while target is None and time.monotonic() < deadline and proc.poll() is None:
                if sel.select(timeout=1.0):
                    lines.append(proc.stdout.readline())
                    match = re.search(r"listening on (\S+:\d+) \(TLS\)", lines[-1])
                    target = match.group(1) if match else None
        assert target, "".join(lines)
        assert "stage 1 on, PerFit on, pool on" in lines[-1]
        uid = setup["targets"][0].id
        with InferenceClient(target, setup["certs"]) as client:
            for name in ("lora-c", "perpcs", "perfit"):
                kwargs = _personalization(setup, client, name, uid)
                assert client.generate(setup["prompts"][0], max_new_tokens=3,
                                       min_new_tokens=3, **kwargs)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "pfl serve: stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
