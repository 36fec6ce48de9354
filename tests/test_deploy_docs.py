"""docs/deployment.md, run as written, on loopback.

Every fenced ``bash`` block after a ``<!-- step: ROLE [background] [port=N] [run] -->``
marker runs in bash, in the folder of its machine: ``cloud``, ``operator``, each of the three
``device`` folders (the block runs once per device, ``DEVICE=0`` becoming its number) or
``local``. ``<!-- copy: ROLE:PATH -> ROLE:PATH -->`` does the file copy the page asks a
person to make. The only changes to the text: ``HOST`` and ``0.0.0.0`` become 127.0.0.1,
the ports free ones (one per device for the SuperNode's 9094), ``PFL_CHECKOUT`` this
checkout. A background step must listen on its port; every process started is stopped at
the end, even on failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client import audit
from simulations.deploy import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
DEVICES = 3
MARKER = re.compile(
    r"<!-- step: (?P<role>[\w-]+)(?P<flags>[^>]*?) -->\s*```bash\n(?P<body>.*?)```"
    r"|<!-- copy: (?P<src>\w+):(?P<src_path>\S+) -> (?P<dst>\w+):(?P<dst_path>\S+) -->",
    re.S)
SHARED_PORTS = (9093, 50061, 50071)


def steps() -> list[dict]:
    """The page's steps and copies, in order."""
    out = []
    for match in MARKER.finditer(DOC.read_text()):
        if match["role"]:
            flags = match["flags"].split()
            port = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("port=")),
                        None)
            out.append({"kind": "step", "role": match["role"], "body": match["body"],
                        "background": "background" in flags, "run": "run" in flags,
                        "port": port})
        else:
            out.append({"kind": "copy", "src": match["src"], "src_path": match["src_path"],
                        "dst": match["dst"], "dst_path": match["dst_path"]})
    return out


@pytest.fixture
def machines(tmp_path):
    """Run the page's steps; stop every background process at the end."""
    started: list[subprocess.Popen] = []
    ports = {port: free_port() for port in SHARED_PORTS}
    device_ports = {i: free_port() for i in range(DEVICES)}
    folders = {name: tmp_path / name for name in ("cloud", "operator", "local")}
    folders.update({f"device-{i}": tmp_path / f"device-{i}" for i in range(DEVICES)})
    for folder in folders.values():
        folder.mkdir()

    def text(body: str, device: int | None) -> str:
        body = re.sub(r"\bHOST\b", "127.0.0.1", body).replace("0.0.0.0", "127.0.0.1")
        body = body.replace("PFL_CHECKOUT", str(REPO))
        if device is not None:
            body = body.replace("DEVICE=0", f"DEVICE={device}")
            body = re.sub(r"\b9094\b", str(device_ports[device]), body)
        for port, free in ports.items():
            body = re.sub(rf"\b{port}\b", str(free), body)
        return body

    def env(folder: Path) -> dict:
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(folder / "flwr-home"), "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1"}

    def run(step: dict, timeout: float = 900) -> list[str]:
        """Run one step on each machine it names; the outputs of its foreground runs."""
        if step["kind"] == "copy":
            for device in (range(DEVICES) if "devices" in (step["src"], step["dst"])
                           else [None]):
                def where(role, path):
                    name = f"device-{device}" if role == "devices" else role
                    return folders[name] / path.replace("$DEVICE", str(device))
                shutil.copyfile(where(step["src"], step["src_path"]),
                                where(step["dst"], step["dst_path"]))
            return []
        outputs = []
        targets = range(DEVICES) if step["role"] == "device" else [None]
        for device in targets:
            folder = folders[f"device-{device}" if device is not None else step["role"]]
            script = text(step["body"], device)
            if step["background"]:
                log = folder / f"background-{len(started)}.log"
                proc = subprocess.Popen(["bash", "-c", script], cwd=folder, env=env(folder),
                                        stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
                started.append(proc)
                if step["port"]:
                    wait_for_port(ports[step["port"]], proc, log, timeout=120)
                continue
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder,
                                  env=env(folder), capture_output=True, text=True,
                                  timeout=timeout)
            assert done.returncode == 0, (f"step on {folder.name} failed:\n{script}\n"
                                          f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            outputs.append(done.stdout + done.stderr)
        return outputs

    yield run, folders
    for proc in reversed(started):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(started):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def test_the_page_has_the_steps_this_test_runs():
    found = steps()
    roles = {s["role"] for s in found if s["kind"] == "step"}
    assert roles == {"local", "cloud", "device", "operator"}
    assert sum(1 for s in found if s.get("run")) == 1
    assert {s["port"] for s in found if s.get("background") and s["port"]} <= \
        set(SHARED_PORTS)


def test_one_machine_one_command_as_written(machines):
    run, folders = machines
    (output,) = [out for step in steps() if step.get("role") == "local"
                 for out in run(step)]
    summary = json.loads((folders["local"] / "runs/deploy/run/federation.json").read_text())
    for name in ("nonpersonalized", "oppu", "perpcs", "perfit"):
        assert "metrics" in summary["methods"][name], summary["methods"][name]
    assert "results:" in output and "every process stopped" in output


def test_several_machines_as_written(machines):
    run, folders = machines
    outputs = []
    for step in steps():
        if step.get("role") != "local":
            outputs += run(step)
    summary = json.loads((folders["cloud"] / "run" / "federation.json").read_text())
    assert summary["nodes"] == DEVICES
    for name in ("nonpersonalized", "oppu", "perpcs", "perfit"):
        assert "metrics" in summary["methods"][name], summary["methods"][name]
    assert (folders["cloud"] / "run" / "global_arrays.npz").is_file()
    for i in range(DEVICES):
        ledger = folders[f"device-{i}"] / "ledger.jsonl"
        assert audit.verify(ledger).ok and audit.read_entries(ledger)
    assert not any("Traceback" in out for out in outputs)
