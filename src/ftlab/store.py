"""The SQLite store: the only module that touches the database (stdlib sqlite3, WAL mode, versioned schema).

Tables (one row each):

- ``runs``: a run of an experiment (config as JSON, out dir, git SHA, package versions, seed, status);
- ``arms``: a method compared in the run, or a repair point derived from one (``kind`` = train | edit | base);
- ``stages``: one training stage of one arm (status, seconds, trainable params, saved model path);
- ``results``: a suite score of one arm after one stage (stage 0 is the base model, arm ``base``);
- ``items``: the per-item answers and scores behind a result, so "which items flipped" is a query;
- ``artifacts``: files a run wrote (models, reports).

Writers use short transactions with a busy timeout, and every insert is keyed so that a resumed or repeated write
replaces its row instead of duplicating it; two processes can write the same store at once.

Crash safety and concurrency: the file is in WAL mode, so readers (``ftlab runs``, ``ftlab report``) never wait for
a writer and never see half of a transaction. Every write is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction (a
result and all its items together), taken under a 60 s busy timeout and retried while another process holds the
lock, so "database is locked" does not reach the user. A process killed inside a transaction leaves nothing of it.
A full disk becomes one line (``DiskFullError``) and the transaction is rolled back. A stage whose loss became NaN is
stored as a ``failed`` stage row with its message in ``error`` (schema 2), and its run as ``failed``.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ftlab import faults
from ftlab.atomic import disk_full, is_disk_full
from ftlab.errors import InputError

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 60

# MIGRATIONS[i] takes the schema from version i to i + 1; append, never edit, when the schema changes.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, name TEXT, out_dir TEXT, config TEXT, created REAL, finished REAL,
        status TEXT, git_sha TEXT, versions TEXT, seed INTEGER
    );
    CREATE TABLE arms (
        run_id TEXT, arm TEXT, kind TEXT, method TEXT, parent TEXT, config TEXT,
        PRIMARY KEY (run_id, arm)
    );
    CREATE TABLE stages (
        run_id TEXT, arm TEXT, stage INTEGER, name TEXT, status TEXT, train_seconds REAL,
        trainable_params INTEGER, optimizer_state_bytes INTEGER, steps INTEGER, model_path TEXT, info TEXT,
        finished REAL, PRIMARY KEY (run_id, arm, stage)
    );
    CREATE TABLE results (
        run_id TEXT, arm TEXT, stage INTEGER, suite TEXT, role TEXT, metric TEXT, score REAL, n INTEGER,
        stderr REAL, higher_is_better INTEGER, PRIMARY KEY (run_id, arm, stage, suite)
    );
    CREATE TABLE items (
        run_id TEXT, arm TEXT, stage INTEGER, suite TEXT, item_id TEXT, prompt TEXT, output TEXT,
        reference TEXT, score REAL, PRIMARY KEY (run_id, arm, stage, suite, item_id)
    );
    CREATE TABLE artifacts (
        run_id TEXT, arm TEXT, kind TEXT, path TEXT, PRIMARY KEY (run_id, arm, kind)
    );
    """,
    # 2: the one-line message of a failed stage (NaN loss) and of a failed run
    """
    ALTER TABLE runs ADD COLUMN error TEXT;
    ALTER TABLE stages ADD COLUMN error TEXT;
    """,
]


def default_store_path() -> Path:
    """``$FTLAB_STORE``, else ``~/.local/share/ftlab/ftlab.db``."""
    env = os.environ.get("FTLAB_STORE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "ftlab" / "ftlab.db"


class _NoWrites:
    """Stands in for a connection inside a write transaction of a read-only store: statements are dropped."""

    def execute(self, *args: Any) -> None:
        return None

    executemany = execute


class StoreError(InputError):
    """A store path that is not a usable ftlab store (a folder, another file, a newer schema)."""


def _check_store_file(path: Path) -> None:
    """Refuse a path that is a folder or an existing file that is not SQLite, before SQLite touches it."""
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, not an ftlab store file")
    # While a writer checkpoints its write-ahead log into the file (SQLite does so whenever a writer's last connection
    # closes), page 1 with the new page count is written before the pages after it, and the -wal file is deleted at
    # the end: a live store can look cut short for a moment (measured: about 1 read in 160 of a store under constant
    # writes, 1 in 30,000 with no -wal left beside it). So a store with a -wal beside it is left to SQLite, and a
    # short file is read again before it is refused: a checkpoint finishes in milliseconds, a cut file stays cut.
    for attempt in range(_SHORT_READS):
        size = path.stat().st_size if path.is_file() else 0
        if not size:
            return
        with path.open("rb") as fh:
            head = fh.read(100)
        if head[:16] != b"SQLite format 3\x00":
            raise StoreError(f"{path}: not an SQLite file, so not an ftlab store (it was left untouched)")
        page = int.from_bytes(head[16:18], "big") if len(head) >= 18 else 0
        page = 65536 if page == 1 else page
        pages = int.from_bytes(head[28:32], "big") if len(head) >= 32 else 0
        if len(head) >= 100 and (size >= page * pages or Path(f"{path}-wal").exists()):
            return
        if attempt < _SHORT_READS - 1:
            time.sleep(0.05)
    raise StoreError(
        f"{path}: not a readable ftlab store (the file is cut short: {size} of {page * pages} bytes); "
        "it was left untouched"
    )


_SHORT_READS = 3  # reads of a store that looks cut short before it is refused (50 ms apart)


class Store:
    """A handle on one SQLite file; cheap to create, safe to share between processes."""

    def __init__(self, path: str | Path | None = None, read_only: bool = False) -> None:
        """Open (and create or migrate) a store; ``read_only`` turns every write into a no-op (non-main processes)."""
        self.path = Path(path) if path else default_store_path()
        self.read_only = read_only
        _check_store_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con:
                self._check_schema(con)  # before anything writes: a store ftlab cannot use stays as it was
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    _retry(lambda: con.execute("PRAGMA journal_mode=WAL"))
                if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    self._migrate(con)
        except sqlite3.OperationalError as err:
            if is_disk_full(err):
                raise disk_full(self.path, err) from None
            if "locked" in str(err) or "busy" in str(err):
                raise StoreError(f"{self.path}: another process held the store for over {BUSY_TIMEOUT_S} s; "
                                 "try again") from None  # fmt: skip
            raise StoreError(f"{self.path}: not a readable ftlab store ({err}); it was left untouched") from None
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: not a readable ftlab store ({err}); it was left untouched") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection | _NoWrites]:
        """One short write transaction: all of it is stored, or (killed, full disk, an error) none of it."""
        if self.read_only:
            yield _NoWrites()
            return
        con = self._connect()
        try:
            _retry(lambda: con.execute("BEGIN IMMEDIATE"))
            try:
                yield con
                faults.point("store")
                _retry(lambda: con.execute("COMMIT"))
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            if is_disk_full(err):
                raise disk_full(self.path, err) from None
            raise
        finally:
            con.close()

    def _check_schema(self, con: sqlite3.Connection) -> None:
        """Refuse (read-only) a newer schema or an SQLite file that holds other tables."""
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store schema version {version} is newer than this ftlab's ({SCHEMA_VERSION}); "
                "upgrade ftlab to read it (the store was left untouched)"
            )
        if version == 0 and con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{self.path}: an SQLite file but not an ftlab store (it was left untouched)")

    def _migrate(self, con: sqlite3.Connection) -> None:
        _retry(lambda: con.execute("BEGIN IMMEDIATE"))
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]  # again: another process may have migrated
            for step in MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        con.execute(statement)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        with closing(self._connect()) as con:
            return con.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------ writes
    def start_run(self, run_id: str, name: str, out_dir: str, config: dict, seed: int, git_sha: str, versions: dict):
        """Create the run row, or mark an existing one as running again (resume)."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO runs (run_id, name, out_dir, config, created, status, git_sha, versions, seed) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET status='running', error=NULL",
                (run_id, name, out_dir, json.dumps(config), time.time(), git_sha, json.dumps(versions), seed),
            )

    def forget_run(self, run_id: str) -> None:
        """Delete every row of a run (used when its output folder is gone, so nothing stale is reused)."""
        with self._tx() as con:
            for table in ("items", "results", "artifacts", "stages", "arms", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))

    def finish_run(self, run_id: str, status: str = "done", error: str | None = None) -> None:
        """Mark a run ``done`` (or ``failed``, with its one-line ``error``)."""
        with self._tx() as con:
            con.execute(
                "UPDATE runs SET status=?, finished=?, error=? WHERE run_id=?", (status, time.time(), error, run_id)
            )

    def fail_stage(self, run_id: str, arm: str, stage: int, name: str, error: str, steps: int | None = None) -> None:
        """Record a stage that stopped (NaN loss): a ``failed`` stage row with its message, and the run ``failed``."""
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO stages (run_id, arm, stage, name, status, steps, error, finished) "
                "VALUES (?, ?, ?, ?, 'failed', ?, ?, ?)",
                (run_id, arm, stage, name, steps, error, time.time()),
            )
            con.execute(
                "UPDATE runs SET status='failed', finished=?, error=? WHERE run_id=?", (time.time(), error, run_id)
            )

    def failed_stages(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM stages WHERE run_id=? AND status='failed' ORDER BY arm, stage", (run_id,))

    def add_arm(self, run_id: str, arm: str, kind: str, method: str, parent: str | None, config: dict) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO arms (run_id, arm, kind, method, parent, config) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, arm, kind, method, parent, json.dumps(config)),
            )

    def finish_stage(self, run_id: str, arm: str, stage: int, name: str, **fields: Any) -> None:
        """Record a finished stage: train_seconds, trainable_params, optimizer_state_bytes, steps, model_path, info."""
        info = json.dumps(fields.get("info", {}), default=str)
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO stages (run_id, arm, stage, name, status, train_seconds, trainable_params, "
                "optimizer_state_bytes, steps, model_path, info, finished) "
                "VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, arm, stage, name, fields.get("train_seconds"), fields.get("trainable_params"),
                    fields.get("optimizer_state_bytes"), fields.get("steps"), fields.get("model_path"), info,
                    time.time(),
                ),
            )  # fmt: skip

    def add_result(self, run_id: str, arm: str, stage: int, role: str, result: Any) -> None:
        """Store a SuiteResult and its items in one transaction (replacing an earlier copy)."""
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO results (run_id, arm, stage, suite, role, metric, score, n, stderr, "
                "higher_is_better) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, arm, stage, result.suite, role, result.metric, float(result.score), result.n,
                    float(result.stderr), int(result.higher_is_better),
                ),
            )  # fmt: skip
            con.execute(
                "DELETE FROM items WHERE run_id=? AND arm=? AND stage=? AND suite=?",
                (run_id, arm, stage, result.suite),
            )
            con.executemany(
                "INSERT OR REPLACE INTO items (run_id, arm, stage, suite, item_id, prompt, output, reference, score) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        arm,
                        stage,
                        result.suite,
                        str(it.item_id),
                        it.prompt,
                        it.output,
                        str(it.reference),
                        float(it.score),
                    )
                    for it in result.items
                ],
            )

    def add_artifact(self, run_id: str, arm: str, kind: str, path: str) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts (run_id, arm, kind, path) VALUES (?, ?, ?, ?)",
                (run_id, arm, kind, str(path)),
            )

    # ------------------------------------------------------------------ reads
    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        """One read, in one implicit transaction: a consistent snapshot (WAL), never half of another's write."""
        con = self._connect()
        try:
            return _retry(lambda: [dict(r) for r in con.execute(sql, args).fetchall()])
        finally:
            con.close()

    def runs(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM runs ORDER BY created DESC")

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run; ``run_id`` may be a unique prefix."""
        rows = self._rows("SELECT * FROM runs WHERE run_id LIKE ? ORDER BY created DESC", (run_id + "%",))
        if len(rows) > 1 and not any(r["run_id"] == run_id for r in rows):
            raise KeyError(f"run id prefix {run_id!r} is ambiguous: {', '.join(r['run_id'] for r in rows)}")
        rows = [r for r in rows if r["run_id"] == run_id] or rows
        return rows[0] if rows else None

    def arms(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM arms WHERE run_id=? ORDER BY rowid", (run_id,))

    def stages(self, run_id: str, arm: str | None = None) -> list[dict[str, Any]]:
        if arm is None:
            return self._rows("SELECT * FROM stages WHERE run_id=? ORDER BY arm, stage", (run_id,))
        return self._rows("SELECT * FROM stages WHERE run_id=? AND arm=? ORDER BY stage", (run_id, arm))

    def stage_done(self, run_id: str, arm: str, stage: int) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT * FROM stages WHERE run_id=? AND arm=? AND stage=? AND status='done'", (run_id, arm, stage)
        )
        return rows[0] if rows else None

    def results(self, run_id: str, arm: str | None = None) -> list[dict[str, Any]]:
        if arm is None:
            return self._rows("SELECT * FROM results WHERE run_id=? ORDER BY arm, stage, suite", (run_id,))
        return self._rows("SELECT * FROM results WHERE run_id=? AND arm=? ORDER BY stage, suite", (run_id, arm))

    def has_result(self, run_id: str, arm: str, stage: int, suite: str) -> bool:
        rows = self._rows(
            "SELECT 1 FROM results WHERE run_id=? AND arm=? AND stage=? AND suite=?", (run_id, arm, stage, suite)
        )
        return bool(rows)

    def items(self, run_id: str, arm: str, stage: int, suite: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT * FROM items WHERE run_id=? AND arm=? AND stage=? AND suite=? ORDER BY item_id",
            (run_id, arm, stage, suite),
        )

    def run_items(self, run_id: str) -> list[dict[str, Any]]:
        """Every item score of a run: ``{"arm", "stage", "suite", "item_id", "score"}`` rows (no texts)."""
        return self._rows("SELECT arm, stage, suite, item_id, score FROM items WHERE run_id = ?", (run_id,))

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM artifacts WHERE run_id=?", (run_id,))

    def count(self, table: str, run_id: str) -> int:
        if table not in ("arms", "stages", "results", "items", "artifacts"):
            raise ValueError(table)
        return self._rows(f"SELECT COUNT(*) AS n FROM {table} WHERE run_id=?", (run_id,))[0]["n"]


def _retry(do: Any, attempts: int = 8) -> Any:
    """Run ``do()``, retrying with a short random backoff while SQLite says the database is locked or busy (the busy
    timeout covers most waits; this covers the few cases SQLite reports without waiting, such as a lock upgrade)."""
    for attempt in range(attempts):
        try:
            return do()
        except sqlite3.OperationalError as err:
            text = str(err).lower()
            if attempt == attempts - 1 or ("locked" not in text and "busy" not in text):
                raise
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.05)
    return None
