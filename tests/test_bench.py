"""The benchmark suite's own machinery: process-tree memory, storage accounting, tables."""

from __future__ import annotations

import json

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from simulations.bench_population import population_table, run_measured


def test_peak_memory_counts_every_descendant(tmp_path):
    """A child that starts a grandchild holding ~300 MB: the tree's peak sees it."""
    script = textwrap.dedent("""
        import subprocess, sys
        grandchild = ("import time; data = bytearray(300 * 2**20); "
                      "data[::4096] = b'x' * len(data[::4096]); time.sleep(1.5)")
        subprocess.run([sys.executable, "-c", grandchild], check=True)
    """)
    result = run_measured([sys.executable, "-c", script], log_path=tmp_path / "log.txt",
                          interval=0.1)
    assert result["returncode"] == 0
    assert result["peak_rss_bytes"] > 300 * 2**20


def test_a_run_past_its_timeout_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(marker)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """)
    with pytest.raises(subprocess.TimeoutExpired):
        run_measured([sys.executable, "-c", script], log_path=tmp_path / "log.txt",
                     timeout=3.0)
    grandchild = int(marker.read_text())
    gone = not psutil.pid_exists(grandchild) or \
        psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert gone


def test_population_table_reports_ratio_and_memory_growth():
    rows = [{"clients": n, "kind": kind, "updates_per_second": ups, "peak_rss_bytes": rss,
             "wall_seconds": 10.0}
            for n, kind, ups, rss in ((1000, "pfl", 2.0, 2 * 2**30), (1000, "noop", 8.0, 2**30),
                                      (10000, "pfl", 1.5, 2.2 * 2**30),
                                      (10000, "noop", 8.0, 2**30))]
    text = population_table({"method": "perfit", "model": "tiny", "sample_per_round": 100,
                             "rounds": 3, "max_steps": 2, "rows": rows})
    assert "0.25" in text  # 2 / 8
    assert "peak memory at 10,000 vs 1,000 clients: +10.0%" in text
    assert "pfl update rate at 10,000 vs 1,000 clients: -25.0%" in text


def test_storage_totals_are_server_plus_users_times_per_user(tiny):
    from simulations.bench_storage import bench_storage, storage_table

    result = bench_storage("tiny", (10, 1000), sharers=4, pieces_per_module=2)
    methods = result["methods"]
    first, last = result["rows"]
    for name, sizes in methods.items():
        assert first[f"{name}_total"] == sizes["server"] + 10 * sizes["per_user"]
        assert last[f"{name}_total"] - first[f"{name}_total"] == 990 * sizes["per_user"]
    # an OPPU adapter (tiny: 4 layers, q and v, r=8, float32) is its LoRA factors plus
    # the peft files' overhead
    config = tiny.model.config
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    lora = 4 * config.num_hidden_layers * 8 * (2 * config.hidden_size + config.hidden_size + kv)
    assert lora < methods["oppu"]["per_user"] < lora + 20_000
    assert methods["perpcs"]["per_user"] < methods["perfit"]["per_user"] < \
        methods["oppu"]["per_user"]
    assert "OPPU / PER-PCS" in storage_table(result)


def test_patched_engine_loop_asks_only_nodes_with_queued_messages():
    """simulations/flower_patches.py: the same messages reach the queue, and only nodes
    with an undelivered message are asked (Flower's loop asks all N every 0.1 s)."""
    import threading
    from queue import Queue
    from types import SimpleNamespace

    from simulations.flower_patches import add_messages_to_queue_of_pending_nodes

    def message(node, delivered=""):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node,
                                                        delivered_at=delivered))

    class State:
        def __init__(self):
            self.lock = threading.RLock()
            self.message_ins_store = {"a": message(7), "b": message(42), "c": message(9, "t"),
                                      "d": message(99999)}  # 99999 is not a simulated node
            self.asked = []

        def get_message_ins(self, node_id, limit):
            self.asked.append(node_id)
            found = [m for m in self.message_ins_store.values()
                     if m.metadata.dst_node_id == node_id and not m.metadata.delivered_at][:limit]
            for m in found:
                m.metadata.delivered_at = "now"
            return found

    state, queue, stop = State(), Queue(), threading.Event()
    nodes = {node: i for i, node in enumerate(range(10_000))}
    worker = threading.Thread(target=add_messages_to_queue_of_pending_nodes,
                              args=(state, queue, nodes, stop))
    worker.start()
    time.sleep(0.35)  # a few ticks
    stop.set()
    worker.join(timeout=5)
    assert sorted(state.asked) == [7, 42]  # asked once each, never the other 9,998 nodes
    delivered = sorted(queue.get().metadata.dst_node_id for _ in range(queue.qsize()))
    assert delivered == [7, 42]


def test_cached_node_listing_gives_flowers_answer_through_every_change():
    """simulations/flower_patches.py: the online nodes listed from the cache equal Flower's
    own listing after nodes are added, deleted, deactivated, reactivated, and when a lease
    runs out; an unchanged table is not walked again."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import (InMemoryLinkState,
                                                                     RunRecord)
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    from simulations import flower_patches

    assert flower_patches.patch_simulation_engine()
    original = flower_patches.FLOWER_GET_NODES  # Flower's own listing, kept by the patch
    assert original is not None and original is not flower_patches.cached_get_nodes
    assert InMemoryLinkState.get_nodes is flower_patches.cached_get_nodes
    factory = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(),
                               ObjectStoreFactory())
    mapping = _register_nodes(50, factory)
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.federation_id = NOOP_FEDERATION_ID  # as Flower's run_simulation sets it
    state.run_ids[7] = RunRecord(run=run)
    nodes = list(mapping)

    def check():
        assert state.get_nodes(7) == original(state, 7)
        return state.get_nodes(7)

    assert check() == set(nodes) and state.get_nodes(8) == set()
    walks = []
    state.get_node_info = lambda **kw: walks.append(1) or InMemoryLinkState.get_node_info(
        state, **kw)
    state.get_nodes(7)
    assert walks == []  # nothing changed: the cached set, not a walk of every node
    state.deactivate_node(nodes[0])
    assert nodes[0] not in check()
    state.activate_node(nodes[0], heartbeat_interval=30.0)
    assert nodes[0] in check()
    state.delete_node(state.nodes[nodes[1]].owner_aid, nodes[1])
    assert nodes[1] not in check()
    new = state.create_node(state.nodes[nodes[0]].owner_aid, "none", b"k" * 32,
                            heartbeat_interval=30.0)
    assert new not in check()  # registered, not online yet
    state.acknowledge_node_heartbeat(new, heartbeat_interval=0.2)  # a short lease
    assert new in check()
    lapse = state.nodes[new].online_until - time.time()
    assert 0 < lapse < 5
    time.sleep(lapse + 0.05)  # the lease runs out with no call to the state at all
    listed = check()
    assert new not in listed and nodes[0] in listed and len(listed) == 49


def test_bench_serve_prints_rates_and_its_load_test_checks_every_answer(tmp_path, capsys):
    """`pfl bench serve` on the tiny model: every case at every batch size with its ratio to
    the base model, one user at a time, and a load test whose answers all match the same
    requests answered alone (a mismatch or a failed request makes the command fail)."""
    import json

    from simulations.cli import main

    code = main(["bench", "serve", "--model", "tiny", "--batch-sizes", "2,4", "--new-tokens",
                 "3", "--repeats", "1", "--clients", "6", "--requests", "30", "--max-batch",
                 "4", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "serve.json").read_text())
    cases = {(r["batch"], r["case"]) for r in result["rows"]}
    for size in (2, 4):
        assert {(size, c) for c in ("base", "lora-c", "oppu", "perpcs", "perfit", "mixed")} <= cases
    assert (2, "one-at-a-time") in cases and (tmp_path / "serve.png").stat().st_size > 0
    load = result["load_test"]
    assert load["answered"] == 30 and load["failed"] == 0 and load["wrong_answers"] == 0
    assert load["max_batch_rows"] > 1 and "load test: 6 clients, 30/30 answered" in out


def test_bench_device_measures_each_backend_in_its_own_process(tmp_path, capsys, onnx_cache):
    """`pfl bench device` on the tiny model: each backend's time to first token, decode rate
    and memory at each batch size, measured in a process of its own (so each peak is that
    backend's), with a table, JSON and PNG."""
    import json

    from simulations.cli import main

    code = main(["bench", "device", "--model", "tiny", "--batch-sizes", "1,2", "--new-tokens",
                 "3", "--repeats", "1", "--threads", "1", "--backends", "torch,onnx-int4",
                 "--cache-dir", str(onnx_cache), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "device.json").read_text())
    assert [r["backend"] for r in result["results"]] == ["torch", "onnx-int4"]
    pids = set()
    for r in result["results"]:
        assert [row["batch"] for row in r["rows"]] == [1, 2]
        assert all(row["ttft_seconds"] > 0 and row["decode_tokens_per_second"] > 0
                   for row in r["rows"])
        assert r["peak_rss_bytes"] > r["baseline_rss_bytes"] > 0
        pids.add(r["pid"])
    assert len(pids) == 2 and os.getpid() not in pids
    assert (tmp_path / "device.png").stat().st_size > 0
    assert "onnx-int4" in out and "TTFT" in out


def test_bench_privacy_runs_every_setting_and_counts_what_each_device_sent(tmp_path, capsys):
    """`pfl bench privacy` on the tiny model, 3 devices: plain, DP, SecAgg+ and both; every
    round accepted all 3 devices; DP rows report epsilon; under SecAgg+ a device sends more
    (keys, shares, and masked vectors of 64-bit integers instead of float32 arrays)."""
    import json

    from simulations.cli import main

    code = main(["bench", "privacy", "--devices", "3", "--rounds", "1", "--repeats", "1",
                 "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((tmp_path / "privacy.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "dp", "secagg", "secagg+dp"}
    assert all(r["accepted"] == [3] and r["devices"] == 3 for r in rows.values())
    assert rows["plain"]["epsilon"] is None and rows["dp"]["epsilon"] > 0
    assert rows["secagg+dp"]["epsilon"] == rows["dp"]["epsilon"]
    assert rows["secagg"]["secagg"]["threshold"] == 2 and rows["plain"]["secagg"] is None
    up = {k: r["up_bytes_per_device_round"] for k, r in rows.items()}
    assert up["plain"] > 0 and up["secagg"] > 1.5 * up["plain"]
    assert rows["secagg"]["down_bytes_per_device_round"] > \
        rows["plain"]["down_bytes_per_device_round"]
    assert "secagg+dp" in out and (tmp_path / "privacy.png").stat().st_size > 0


def test_bench_attack_measures_honest_calls_alone_and_beside_attackers(tmp_path, capsys):
    from simulations import cli

    code = cli.main(["bench", "attack", "--services", "pool", "--seconds", "2", "--held", "8",
                     "--flood", "4", "--clients", "2", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "attack.json").read_text())
    (row,) = result["rows"]
    assert row["without_attack"]["calls"] > 0 and row["under_attack"]["calls"] > 0
    assert row["attack"]["held_opened"] >= 8 and row["attack"]["flood_ok"] > 0
    assert "pool (ListGates)" in out and code in (0, 1)  # 1: the 2x target missed, said so


def test_bench_poison_on_the_tiny_model(tmp_path, capsys):
    """``pfl bench poison``: one in-bound attacker changes every answer of the papers'
    assembly alone and none of the defended variants'; the rows pair each against the same
    variant with no attacker."""
    from simulations import cli

    code = cli.main(["bench", "poison", "--model", "tiny", "--users", "3", "--sharers", "3",
                     "--collective", "2", "--max-history", "8", "--set", "perpcs.gate_steps=5",
                     "--set", "perpcs.gate_lr=0.01", "--attackers", "0,1", "--quiet",
                     "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "vs no attacker" in out
    rows = {(r["attackers"], r["variant"]): r for r in
            json.loads((tmp_path / "poison.json").read_text())["rows"]}
    assert rows[(1, "gates-undefended")]["changed_answers"] > 0
    assert rows[(1, "gates")]["changed_answers"] == 0
    assert rows[(1, "loss")]["changed_answers"] == 0
    assert "vs_no_attacker" in rows[(1, "gates")] and "vs_no_attacker" not in rows[(0, "gates")]
