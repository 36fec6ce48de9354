"""Per-client state on disk, keyed by partition id (never in Flower's ``context.state``).

Flower keeps every virtual client's Context in RAM for the whole simulation, so anything a
client keeps between rounds lives here instead, one directory per partition under the run
folder::

    RUN_DIR/clients/partition-00003/
        ledger.jsonl     the device's hash-chained audit ledger (edge_client.audit)
        state.json       small JSON facts: rounds joined, examples, losses, timings
        arrays/NAME.npz  named array dicts a client wants back later (e.g. its last update)

Writes are atomic (temp file + rename), so a killed client never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from shared.errors import PflError
from shared.files import save_npz, write_atomic

CLIENTS_DIR = "clients"
LEDGER_FILE = "ledger.jsonl"
STATE_FILE = "state.json"


def partition_dir(run_dir: str | os.PathLike, partition_id: int) -> Path:
    """``RUN_DIR/clients/partition-NNNNN`` (not created)."""
    pid = int(partition_id)
    if pid < 0:
        raise PflError(f"partition id must be >= 0, got {partition_id}")
    return Path(run_dir) / CLIENTS_DIR / f"partition-{pid:05d}"


def ledger_path(run_dir: str | os.PathLike, partition_id: int) -> Path:
    """Where the audit ledger of partition ``partition_id`` lives in this run folder."""
    return partition_dir(run_dir, partition_id) / LEDGER_FILE


def ledger_paths(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{partition id: ledger path}`` of every client that wrote a ledger in this run."""
    found = {}
    for path in sorted((Path(run_dir) / CLIENTS_DIR).glob(f"partition-*/{LEDGER_FILE}")):
        found[int(path.parent.name.split("-", 1)[1])] = path
    return found


class ClientState:
    """The on-disk state of one (virtual) client: partition ``partition_id`` of ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike, partition_id: int):
        self.partition_id = int(partition_id)
        self.directory = partition_dir(run_dir, self.partition_id)

    @classmethod
    def at(cls, directory: str | os.PathLike, partition_id: int) -> "ClientState":
        """The state kept in ``directory`` itself (a device's own ``state-dir``)."""
        state = cls.__new__(cls)
        state.partition_id = int(partition_id)
        state.directory = Path(directory)
        return state

    @property
    def ledger_path(self) -> Path:
        return self.directory / LEDGER_FILE

    # ------------------------------------------------------------------ JSON facts
    def read(self) -> dict[str, Any]:
        """The client's ``state.json`` ({} when it has none yet)."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text("utf-8"))
        except ValueError as exc:
            raise PflError(f"{path}: not valid JSON ({exc})") from None

    def write(self, data: Mapping[str, Any]) -> None:
        """Replace ``state.json`` with ``data`` (atomically)."""
        text = json.dumps(dict(data), indent=1, sort_keys=True).encode("utf-8")
        write_atomic(self.directory / STATE_FILE, text)

    def record_round(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Append one round's facts (numbers and short names only) to ``rounds``."""
        data = self.read()
        data.setdefault("partition_id", self.partition_id)
        data.setdefault("rounds", []).append(dict(entry))
        self.write(data)
        return data

    # ------------------------------------------------------------------ arrays
    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> Path:
        """Save a named dict of arrays as ``arrays/NAME.npz`` (atomically)."""
        if not name or "/" in name or name.startswith("."):
            raise PflError(f"bad array set name {name!r}")
        path = self.directory / "arrays" / f"{name}.npz"
        plain = {key: np.asarray(value) for key, value in arrays.items()}
        save_npz(path, plain)
        return path

    def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """The dict saved by :meth:`save_arrays` under ``name``, or None."""
        path = self.directory / "arrays" / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def __repr__(self) -> str:
        return f"<ClientState partition={self.partition_id} at {self.directory}>"
