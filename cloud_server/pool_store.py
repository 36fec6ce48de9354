"""The persistent piece pool: SQLite (WAL) metadata plus content-addressed blob files.

Layout of a pool directory::

    pool.sqlite3            metadata: pieces (id, sharer, layer, module, rank, dtypes, shapes,
                            sha256, signature, public key, consent flags, time, the gate),
                            sharers (pseudonym -> public key, bound on first submission) and
                            grants (federation grant -> the device key bound to it, pieces
                            used of the pieces allowed)
    blobs/ab/abcdef...      one file per piece: its content bytes, named by their sha256,
                            which is the piece id (shared.serialization.content_bytes)

Crash safety: blobs are written to a temporary file, fsynced and renamed (then the folder is
fsynced) *before* the metadata transaction commits, and SQLite runs in WAL mode with
``synchronous=FULL``; a killed process leaves at worst an unreferenced blob or temp file,
never a row without its blob. A batch is all-or-nothing. Every fetch re-hashes the blob,
so a file changed on disk is detected (:class:`PoolCorruption`). Blobs left by a killed
submission are swept when the pool is opened (:meth:`PoolStore.sweep_orphans`).

Who may submit: with a ``federation_key`` (the raw public key of the cloud server's grant
key), only a device presenting a :class:`~shared.serialization.Grant` signed with it, bound to
the first device key that uses it and good for ``max_pieces`` pieces; without one, anyone
with a device key (*open enrolment*, for development). With ``shapes``
(:class:`~shared.serialization.ModelShapes`), a piece must fit a real layer and module of the
model. Every piece must carry the consent flag ``pool = true``.

Concurrency: writes are serialized by one lock around one connection and take it only for
the metadata transaction (blobs are written before); reads use a connection of their own per
thread and never wait for that lock (SQLite WAL: readers see the last committed state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from shared import crypto
from shared.errors import PflError
from shared.files import write_atomic
from shared.methods.perpcs.check import norm_outliers
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import Piece, tensor_bytes
from shared.serialization import (DEFAULT_LIMITS, Gate, Grant, InvalidPiece, Limits,
                                  ModelShapes, SignedPiece, check_consent, content_bytes,
                                  is_piece_id, piece_from_content_bytes, tensor_from_proto,
                                  update_norm, validate_piece)
from shared.wire import pfl_pb2

DB_NAME = "pool.sqlite3"
BLOB_DIR = "blobs"
log = logging.getLogger(__name__)
SCHEMA_VERSION = 2  # 2: pieces.update_norm (a version-1 pool gains it when opened)
_STALE_TMP_SECONDS = 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sharers (
    sharer      TEXT PRIMARY KEY,
    public_key  BLOB NOT NULL,
    first_seen  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pieces (
    piece_id    TEXT PRIMARY KEY,
    sharer      TEXT NOT NULL REFERENCES sharers(sharer),
    layer       INTEGER NOT NULL,
    module      TEXT NOT NULL,
    rank        INTEGER NOT NULL,
    d_in        INTEGER NOT NULL,
    d_out       INTEGER NOT NULL,
    scaling     REAL NOT NULL,
    dtypes      TEXT NOT NULL,
    shapes      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    gate        BLOB,
    gate_dtype  TEXT,
    gate_sha256 TEXT,
    signature   BLOB NOT NULL,
    public_key  BLOB NOT NULL,
    consent     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    update_norm REAL
);
CREATE INDEX IF NOT EXISTS pieces_by_key ON pieces(layer, module);
CREATE TABLE IF NOT EXISTS piece_grants (
    piece_id    TEXT NOT NULL REFERENCES pieces(piece_id),
    grant_id    TEXT NOT NULL,
    run         TEXT NOT NULL,
    PRIMARY KEY (piece_id, grant_id)
);
CREATE INDEX IF NOT EXISTS piece_grants_by_run ON piece_grants(run);
CREATE TABLE IF NOT EXISTS grants (
    grant_id    TEXT PRIMARY KEY,
    run         TEXT NOT NULL,
    public_key  BLOB NOT NULL,
    max_pieces  INTEGER NOT NULL,
    used        INTEGER NOT NULL,
    first_used  REAL NOT NULL
);
"""


class PoolCorruption(PflError):
    """A stored blob is missing or does not hash to its piece id."""


class NotPermitted(PflError):
    """A submission the pool's enrolment rules refuse (no grant, a grant bound to another
    key or used up, pieces without pool consent)."""


class PieceNotFound(PflError):
    """Some requested piece ids are not in the pool (``.missing`` lists them)."""

    def __init__(self, missing: Sequence[str]):
        self.missing = list(missing)
        shown = ", ".join(m[:12] for m in self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        super().__init__(f"{len(self.missing)} piece(s) not in the pool: {shown}{more}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: the pool's relative bound on a piece's update norm (PerPcsConfig.max_norm_ratio's default)
DEFAULT_MAX_NORM_RATIO = PerPcsConfig.max_norm_ratio


class PoolStore:
    """A piece pool in a directory; safe to share between threads (one lock) and processes.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory: str | Path, *, limits: Limits = DEFAULT_LIMITS,
                 shapes: ModelShapes | None = None, federation_key: bytes | None = None,
                 sweep: bool = True, max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO):
        self.directory = Path(directory)
        #: :meth:`list_gates` leaves out a piece whose update norm exceeds this multiple of
        #: the median at its (layer, module) among the listed pieces (0: off)
        self.max_norm_ratio = float(max_norm_ratio)
        self.limits = limits
        self.shapes = shapes
        self.federation_key = federation_key
        self.blob_dir = self.directory / BLOB_DIR
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._db = self._connect()
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":  # pragma: no cover - e.g. a network file system
            raise PflError(f"the pool database {self.directory / DB_NAME} cannot use WAL mode")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise PflError(f"pool schema version {version} is not supported "
                           f"(this code reads {SCHEMA_VERSION})")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._remove_stale_temp_files()
        if sweep:
            self.sweep_orphans()

    def _migrate(self) -> None:
        """A version-1 pool: add ``update_norm`` and fill it from the stored blobs."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(pieces)")}
        if "update_norm" in columns:
            return
        self._db.execute("ALTER TABLE pieces ADD COLUMN update_norm REAL")
        for (piece_id,) in self._db.execute("SELECT piece_id FROM pieces").fetchall():
            try:
                norm = update_norm(self.piece(piece_id))
            except (PoolCorruption, PieceNotFound):
                continue  # verify() reports it; its gate is never listed without a norm
            self._db.execute("UPDATE pieces SET update_norm=? WHERE piece_id=?",
                             (norm, piece_id))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.directory / DB_NAME, isolation_level=None,
                             check_same_thread=False, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (readers never take the write lock)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            db.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                self._readers.append(db)
        return db

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the database connections."""
        with self._lock:
            self._db.close()
        with self._readers_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()

    def __enter__(self) -> "PoolStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _remove_stale_temp_files(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for tmp in self.blob_dir.glob("*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass

    def sweep_orphans(self, min_age_seconds: float = _STALE_TMP_SECONDS) -> int:
        """Delete blobs no piece refers to (a submission killed between writing its blobs
        and committing), once older than ``min_age_seconds`` (a younger one may belong to a
        submission in flight in another process). Returns how many were deleted."""
        cutoff = time.time() - min_age_seconds
        removed = 0
        for path in self.blob_dir.glob("??/*"):
            if path.name.startswith(".") or not is_piece_id(path.name):
                continue
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            with self._lock:
                row = self._db.execute("SELECT 1 FROM pieces WHERE piece_id=?",
                                       (path.name,)).fetchone()
                if row is None:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # --------------------------------------------------------------------- blobs
    def blob_path(self, piece_id: str) -> Path:
        """Where the content bytes of ``piece_id`` live."""
        return self.blob_dir / piece_id[:2] / piece_id

    def _blob_ok(self, piece_id: str) -> bool:
        try:
            return hashlib.sha256(self.blob_path(piece_id).read_bytes()).hexdigest() == piece_id
        except OSError:
            return False

    def _write_blob(self, piece_id: str, data: bytes) -> bool:
        """Write a blob atomically unless a good one is there; True if a file was written."""
        if self._blob_ok(piece_id):
            return False
        path = write_atomic(self.blob_path(piece_id), data)
        _fsync_dir(path.parent)
        return True

    # -------------------------------------------------------------------- submit
    def submit(self, pieces: Sequence[SignedPiece], grant: Grant | None = None
               ) -> list[tuple[str, bool]]:
        """Store signed pieces, all or nothing; returns (piece id, created) per input piece.

        Each piece is validated (:class:`InvalidPiece`: wire rules, and the model's shapes
        when the pool knows them), must carry consent ``pool = true`` (:class:`NotPermitted`)
        and its signature must verify (``crypto.SignatureError``); a pseudonym stays bound to
        the first public key it was submitted with. With a federation key, ``grant`` must be
        signed by it, unexpired, bound to this batch's one device key and not used up
        (:class:`NotPermitted`), and each piece's sharer must be its key's pseudonym
        (``crypto.sharer_pseudonym``). Resubmitting a stored piece changes nothing (created=False).
        """
        if not pieces:
            raise InvalidPiece("an empty batch")
        for signed in pieces:
            validate_piece(signed.piece, self.limits)
            if self.shapes is not None:
                self.shapes.check(signed.piece)
            check_consent(signed.consent)
            signed.verify()
            if signed.consent.get("pool") is not True:
                raise NotPermitted(f"piece {signed.piece_id[:12]}: its consent flags do not "
                                   "say pool = true")
        keys: dict[str, bytes] = {}
        for signed in pieces:
            if keys.setdefault(signed.piece.sharer, signed.public_key) != signed.public_key:
                raise crypto.SignatureError(f"sharer {signed.piece.sharer!r} signs with two "
                                            "different keys in one batch")
        if self.federation_key is not None:
            if grant is None:
                raise NotPermitted("this pool takes pieces only from sharers the federation "
                                   "selected: the submission carries no grant")
            try:
                grant.verify(self.federation_key, time.time())
            except crypto.SignatureError as exc:
                raise NotPermitted(f"grant refused: {exc}") from None
            if len(set(keys.values())) != 1:
                raise NotPermitted("a grant covers one device key; this batch has "
                                   f"{len(set(keys.values()))}")
            for sharer, key in keys.items():  # no squatting another device's pseudonym
                if sharer != crypto.sharer_pseudonym(key):
                    raise NotPermitted(f"sharer {sharer[:40]!r} is not the pseudonym of the "
                                       "key that signs its pieces")
        # blobs first, outside the lock: content-addressed, so concurrent writers agree
        written = [signed.piece_id for signed in pieces
                   if self._write_blob(signed.piece_id, content_bytes(signed.piece))]
        with self._lock:
            for signed in pieces:  # another batch that failed may have dropped a shared blob
                if not self.blob_path(signed.piece_id).is_file():
                    self._write_blob(signed.piece_id, content_bytes(signed.piece))
            try:
                return self._insert(pieces, keys, grant if self.federation_key else None)
            except BaseException:
                self._drop_unreferenced(written)
                raise

    def _insert(self, pieces: Sequence[SignedPiece], keys: dict[str, bytes],
                grant: Grant | None) -> list[tuple[str, bool]]:
        db, now = self._db, time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            if grant is not None:
                self._use_grant(grant, next(iter(keys.values())), len(pieces), now)
            for sharer, key in keys.items():
                row = db.execute("SELECT public_key FROM sharers WHERE sharer=?",
                                 (sharer,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO sharers VALUES (?, ?, ?)", (sharer, key, now))
                elif bytes(row[0]) != key:
                    raise crypto.SignatureError(
                        f"sharer {sharer!r} is bound to another public key (fingerprint "
                        f"{crypto.key_fingerprint(bytes(row[0]))}); this one is "
                        f"{crypto.key_fingerprint(key)}")
            results = []
            for signed in pieces:
                cursor = db.execute("INSERT OR IGNORE INTO pieces VALUES "
                                    "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                    self._row(signed, now))
                results.append((signed.piece_id, cursor.rowcount == 1))
                if grant is not None:  # the run whose targets may list it
                    db.execute("INSERT OR IGNORE INTO piece_grants VALUES (?, ?, ?)",
                               (signed.piece_id, grant.grant_id, grant.run))
            db.execute("COMMIT")
            return results
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _use_grant(self, grant: Grant, key: bytes, count: int, now: float) -> None:
        """Bind ``grant`` to ``key`` (first use; a grant minted for a device key is bound to
        that key from the start) and count ``count`` pieces against it."""
        if grant.public_key and grant.public_key != key:
            raise NotPermitted(f"grant {grant.grant_id[:8]} is bound to another device key")
        row = self._db.execute("SELECT public_key, used, max_pieces FROM grants WHERE "
                               "grant_id=?", (grant.grant_id,)).fetchone()
        used = 0
        if row is not None:
            if bytes(row["public_key"]) != key:
                raise NotPermitted(f"grant {grant.grant_id[:8]} is bound to another device key")
            used = int(row["used"])
        if used + count > grant.max_pieces:
            raise NotPermitted(f"grant {grant.grant_id[:8]} allows {grant.max_pieces} pieces; "
                               f"{used} used, {count} more asked")
        if row is None:
            self._db.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?)",
                             (grant.grant_id, grant.run, key, grant.max_pieces, count, now))
        else:
            self._db.execute("UPDATE grants SET used=? WHERE grant_id=?",
                             (used + count, grant.grant_id))

    def grant_keys(self, run: str) -> dict[str, bytes]:
        """{grant id: the device key bound to it} of ``run``'s grants that were used."""
        rows = self._reader().execute("SELECT grant_id, public_key FROM grants WHERE run=?",
                                      (run,)).fetchall()
        return {row[0]: bytes(row[1]) for row in rows}

    @staticmethod
    def _row(signed: SignedPiece, now: float) -> tuple:
        p = signed.piece
        gate = None if p.gate is None else tensor_bytes(p.gate)
        dtypes = {name: None if t is None else str(t.dtype).removeprefix("torch.")
                  for name, t in (("A", p.A), ("B", p.B), ("gate", p.gate))}
        shapes = {name: None if t is None else list(t.shape)
                  for name, t in (("A", p.A), ("B", p.B), ("gate", p.gate))}
        return (p.piece_id, p.sharer, p.layer, p.module, p.rank, p.d_in, p.d_out, p.scaling,
                json.dumps(dtypes), json.dumps(shapes), p.num_bytes, p.piece_id, gate,
                dtypes["gate"], None if gate is None else hashlib.sha256(gate).hexdigest(),
                signed.signature, signed.public_key, json.dumps(dict(signed.consent)), now,
                update_norm(p))

    def _drop_unreferenced(self, piece_ids: Iterable[str]) -> None:
        for piece_id in piece_ids:
            if self._db.execute("SELECT 1 FROM pieces WHERE piece_id=?",
                                (piece_id,)).fetchone() is None:
                self.blob_path(piece_id).unlink(missing_ok=True)

    # ------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return self._reader().execute("SELECT COUNT(*) FROM pieces").fetchone()[0]

    def __contains__(self, piece_id: str) -> bool:
        return self._reader().execute("SELECT 1 FROM pieces WHERE piece_id=?",
                                      (piece_id,)).fetchone() is not None

    def piece_ids(self) -> list[str]:
        """Every stored piece id, in submission order."""
        rows = self._reader().execute("SELECT piece_id FROM pieces ORDER BY rowid").fetchall()
        return [row[0] for row in rows]

    def missing(self, piece_ids: Iterable[str]) -> list[str]:
        """The ids (in order, without repeats) that the pool does not hold."""
        db = self._reader()
        return [pid for pid in dict.fromkeys(piece_ids)
                if db.execute("SELECT 1 FROM pieces WHERE piece_id=?", (pid,)).fetchone()
                is None]

    def sizes(self, piece_ids: Iterable[str]) -> int:
        """Total stored bytes of these pieces (unknown ids count 0)."""
        db = self._reader()
        return sum(int(row[0]) for pid in dict.fromkeys(piece_ids)
                   for row in db.execute("SELECT size FROM pieces WHERE piece_id=?", (pid,)))

    def sharer_key(self, sharer: str) -> bytes | None:
        """The public key a pseudonym is bound to (None if unknown)."""
        row = self._reader().execute("SELECT public_key FROM sharers WHERE sharer=?",
                                     (sharer,)).fetchone()
        return None if row is None else bytes(row[0])

    def list_gates(self, layers: Iterable[int] = (), modules: Iterable[str] = (),
                   sharers: Iterable[str] = (), run: str = "") -> list[Gate]:
        """Gates of the gated pieces matching the filters (an empty filter matches all),
        less those whose update norm exceeds :attr:`max_norm_ratio` x the median of the
        matching pieces at their (layer, module) (:func:`~shared.methods.perpcs.check.
        norm_outliers`): one sharer's outsized pieces never reach a target that assembles
        from gates, whoever submitted first. With ``run``, only pieces submitted under a grant
        of that run (signed by the key the grant is bound to): pieces of other runs, or of a
        grant minted for another run, are not this run's targets' candidates."""
        where, args = [], []
        for column, values in (("layer", layers), ("module", modules), ("sharer", sharers)):
            values = list(values)
            if values:
                where.append(f"{column} IN ({','.join('?' * len(values))})")
                args.extend(values)
        if run:
            where.append("piece_id IN (SELECT pg.piece_id FROM piece_grants pg JOIN grants g "
                         "ON g.grant_id = pg.grant_id WHERE pg.run = ? AND g.run = ? AND "
                         "g.public_key = pieces.public_key)")
            args.extend([run, run])
        sql = ("SELECT piece_id, sharer, layer, module, rank, d_in, gate, gate_dtype, "
               "gate_sha256, signature, public_key, update_norm FROM pieces WHERE gate IS NOT "
               "NULL AND update_norm IS NOT NULL"
               + "".join(f" AND {w}" for w in where) + " ORDER BY layer, module, rowid")
        rows = self._reader().execute(sql, args).fetchall()
        outliers = norm_outliers(rows, self.max_norm_ratio, norm=lambda row: row["update_norm"],
                                 key=lambda row: (row["layer"], row["module"], row["piece_id"]))
        if outliers:
            log.warning("listing gates: %d pieces left out, their update norm exceeds %g x the "
                        "median at their layer and module", len(outliers), self.max_norm_ratio)
        gates = []
        for row in rows:
            if row["piece_id"] in outliers:
                continue
            tensor = pfl_pb2.Tensor(dtype=row["gate_dtype"], shape=[row["d_in"]],
                                    data=bytes(row["gate"]), sha256=row["gate_sha256"])
            try:
                gate = tensor_from_proto(tensor, f"gate of {row['piece_id'][:12]}", self.limits)
            except InvalidPiece as exc:
                raise PoolCorruption(f"stored {exc}") from None
            gates.append(Gate(row["piece_id"], row["sharer"], row["layer"], row["module"],
                              row["rank"], gate, bytes(row["signature"]),
                              bytes(row["public_key"])))
        return gates

    def fetch(self, piece_ids: Sequence[str]) -> list[SignedPiece]:
        """The stored pieces, in the order asked; every blob is re-hashed.

        Raises :class:`PieceNotFound` for unknown ids and :class:`PoolCorruption` for a blob
        that is missing or changed on disk.
        """
        bad = [pid for pid in piece_ids if not is_piece_id(pid)]
        if bad:
            raise InvalidPiece(f"malformed piece id {bad[0][:70]!r}")
        rows = {}
        db = self._reader()
        for pid in dict.fromkeys(piece_ids):
            row = db.execute("SELECT * FROM pieces WHERE piece_id=?", (pid,)).fetchone()
            if row is not None:
                rows[pid] = row
        missing = [pid for pid in dict.fromkeys(piece_ids) if pid not in rows]
        if missing:
            raise PieceNotFound(missing)
        return [self._load(rows[pid]) for pid in piece_ids]

    def _load(self, row: sqlite3.Row) -> SignedPiece:
        piece_id, path = row["piece_id"], self.blob_path(row["piece_id"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PoolCorruption(f"piece {piece_id[:12]}: blob {path} unreadable: "
                                 f"{exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != piece_id:
            raise PoolCorruption(f"piece {piece_id[:12]}: blob {path} does not hash to its id "
                                 "(changed on disk)")
        piece = piece_from_content_bytes(data, row["sharer"])
        if piece.key != (row["layer"], row["module"]):
            raise PoolCorruption(f"piece {piece_id[:12]}: blob and metadata disagree")
        return SignedPiece(piece, bytes(row["signature"]), bytes(row["public_key"]),
                           json.loads(row["consent"]), row["created_at"])

    def piece(self, piece_id: str) -> Piece:
        """One stored piece (a ``PieceLookup`` for ``recipe.rebuild``)."""
        return self.fetch([piece_id])[0].piece

    # ------------------------------------------------------------------ checking
    def verify(self) -> list[str]:
        """Check every blob hash and signature; returns a list of problems (empty if none)."""
        problems = []
        for piece_id in self.piece_ids():
            try:
                self.fetch([piece_id])[0].verify()
            except PflError as exc:
                problems.append(str(exc))
        return problems
