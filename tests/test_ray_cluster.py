"""`pfl simulate --ray-address`: a federation runs on an existing Ray cluster (a real `ray
start --head` process on 127.0.0.1, stopped by the test) and gives the same global arrays as
the private-Ray run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from simulations.simulate import run_stage1_simulation

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """``start()`` starts a Ray head by `ray start --head --block` in its own process group,
    on a temporary folder (short: Ray's sockets live there), and returns ``(address,
    folder)``; everything it started is stopped at the end, even on failure."""
    started = []

    def start():
        started.append(_start_head())
        return next(started[-1])

    yield start
    for head in started:
        next(head, None)  # runs the generator's clean-up


def _start_head():
    temp = Path(tempfile.mkdtemp(prefix="/tmp/pfl-ray-"))
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = (temp / "head.log").open("wb")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false",
                             "--temp-dir", str(temp), "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            ready = subprocess.run([str(BIN / "ray"), "status", "--address", address],
                                   env=env, capture_output=True, text=True, timeout=60)
            if ready.returncode == 0:
                break
            time.sleep(1.0)
        else:
            raise AssertionError("the Ray head did not come up:\n"
                                 + (temp / "head.log").read_text()[-3000:])
        yield address, temp
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        # Ray's own processes of this head (gcs, raylet, workers) name its temp folder
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(temp) in part for part in proc.info["cmdline"] or ()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_federation_runs_on_an_existing_ray_cluster_with_the_private_runs_result(
        tmp_path, ray_head):
    common = dict(method="lora", num_clients=2, rounds=2, model="tiny", seed=0,
                  num_users_per_client=1, max_steps=2, backend="ray")
    private = run_stage1_simulation(run_dir=tmp_path / "private", **common)
    address, temp = ray_head()  # after the private run: a bare ray.init() may join a cluster
    cluster = run_stage1_simulation(run_dir=tmp_path / "cluster", ray_address=address,
                                    **common)
    assert cluster["replies"] == private["replies"] and cluster["rounds"] == 2
    with np.load(cluster["final_arrays"]) as a, np.load(private["final_arrays"]) as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the clients really ran on the cluster: its workers' logs are in its folder
    workers = list(temp.glob("session_*/logs/worker-*"))
    assert workers, "no worker ran on the Ray cluster"
