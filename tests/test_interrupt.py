"""Ctrl-C on `pfl simulate` (Flower's simulation engine on Ray) stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil


def _group(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def _command(proc: psutil.Process) -> str:
    """The command line of a process that may exit (or turn zombie) while we look at it."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_ctrl_c_stops_the_simulation_and_leaves_no_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--clients", "200",
               "--sample-per-round", "10", "--rounds", "50", "--method", "perfit",
               "--run-dir", str(tmp_path / "run")]
    log = open(tmp_path / "log.txt", "wb")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True,  # a group of its own, like a terminal job
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120  # wait (bounded) until Ray's workers are training
        while time.monotonic() < deadline and child.poll() is None:
            if any("ClientAppActor" in _command(p) for p in _group(child.pid)):
                break
            time.sleep(0.5)
        assert child.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
        time.sleep(2)
        assert len(_group(child.pid)) > 3  # the CLI, Ray's daemons and workers
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = child.wait(timeout=60)
        time.sleep(1)
        left = _group(child.pid)
        assert code == 130, (tmp_path / "log.txt").read_text()[-2000:]
        assert not left, [_command(p)[:80] for p in left]
        assert "pfl: interrupted" in (tmp_path / "log.txt").read_text()
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait(timeout=10)
        log.close()
