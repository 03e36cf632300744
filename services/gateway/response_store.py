"""`ResponseStore`: finished Responses API responses by id, for `previous_response_id`, GET,
DELETE and input_items; one SQLite database, shared by every gateway process of a host.

    POST /v1/responses (store: true) -> put(StoredResponse)      after the response is complete
    previous_response_id, GET, input_items -> get(id)            None: unknown, expired or unreadable
    DELETE -> delete(id)

`splitserve gateway --processes N` (and `splitserve up --gateway-processes N`) gives its processes
one database file in a directory it creates for the run, so a conversation continues whichever
process takes the next connection; a single process keeps the same tables in memory. The file is
in WAL mode: readers never wait for the one writer, and writes are a few small rows. Bounds: at
most `max_size` responses (the oldest go first) and each for `ttl_s` of wall-clock time (the
processes share it).

Every access runs on the store's own thread, under `timeout_s` (SQLite's busy timeout for the
lock, and the caller's wait). A database that cannot be read (missing, corrupt, locked past the
timeout) is logged and behaves as empty: the id is not found (404), and a response that cannot be
written is still returned to its client, only not kept. The connection is reopened on the next
access, so a store that comes back (or a file that is recreated) is used again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

DATABASE_FILE = "responses.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    expires_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""

T = TypeVar("T")


@dataclass(frozen=True)
class StoredResponse:
    id: str
    response: dict[str, Any]
    """The Response object as the client received it (GET returns it)."""
    input_items: list[dict[str, Any]]
    """This request's own input items, with ids (GET .../input_items lists them)."""
    conversation: list[dict[str, Any]]
    """Chat messages of the whole chain up to and including this response's output (without
    instructions): what a next turn's `previous_response_id` continues."""
    session_key: str
    """The chain's prompt_cache_key: the one a turn gave, else its previous turn's, else the
    chain's first response id (see responses_routes.session_key)."""

    def to_json(self) -> str:
        return json.dumps({"response": self.response, "input_items": self.input_items,
                           "conversation": self.conversation, "session_key": self.session_key},
                          separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, response_id: str, text: str) -> StoredResponse:
        fields = json.loads(text)
        return cls(response_id, fields["response"], fields["input_items"], fields["conversation"],
                   fields["session_key"])


class ResponseStore:
    def __init__(self, directory: str | None, max_size: int, ttl_s: float, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        """`directory`: where the shared database lives (created here if missing; if it disappears
        later, accesses fail as above); None: in memory, for this process only."""
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        self.directory, self.max_size, self.ttl_s, self.timeout_s = directory, max_size, ttl_s, timeout_s
        self._clock = clock
        self._connection: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, "response-store")  # the connection is used on it alone

    # ---- the gateway's calls (event loop) -------------------------------------------------

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._call(self.get_now, response_id, default=None)

    async def put(self, record: StoredResponse) -> None:
        await self._call(self.put_now, record, default=None)

    async def delete(self, response_id: str) -> bool:
        return await self._call(self.delete_now, response_id, default=False)

    async def _call(self, method: Callable[..., T], *args: Any, default: T) -> T:
        future = asyncio.get_running_loop().run_in_executor(self._thread, method, *args)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            logger.error("response store: %s took over %.1f s; answered as for an empty store", method.__name__,
                         self.timeout_s)
            return default

    def close(self) -> None:
        try:
            self._thread.submit(self._close_connection).result(timeout=self.timeout_s)
        except TimeoutError:  # an access still holds the thread; the process is ending anyway
            logger.error("response store: not closed within %.1f s", self.timeout_s)
        self._thread.shutdown(wait=False)

    # ---- the same, blocking (the store's thread; tests) ---------------------------------

    def get_now(self, response_id: str) -> StoredResponse | None:
        row = self._run(lambda db: db.execute("SELECT record FROM responses WHERE id = ? AND expires_at > ?",
                                              (response_id, self._clock())).fetchone())
        if not row:
            return None
        try:
            return StoredResponse.from_json(response_id, row[0])
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("response store: the record of %s is unreadable (%s); treated as not found", response_id, exc)
            return None

    def put_now(self, record: StoredResponse) -> None:
        if self.max_size == 0:
            return

        def put(db: sqlite3.Connection) -> None:
            with db:  # one transaction
                db.execute("DELETE FROM responses WHERE expires_at <= ?", (self._clock(),))
                db.execute("INSERT OR REPLACE INTO responses (id, expires_at, record) VALUES (?, ?, ?)",
                           (record.id, self._clock() + self.ttl_s, record.to_json()))
                db.execute("DELETE FROM responses WHERE seq <= (SELECT seq FROM responses ORDER BY seq DESC "
                           "LIMIT 1 OFFSET ?)", (self.max_size,))
        self._run(put)

    def delete_now(self, response_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            with db:
                return db.execute("DELETE FROM responses WHERE id = ? AND expires_at > ?",
                                  (response_id, self._clock())).rowcount > 0
        return bool(self._run(delete))

    def count_now(self) -> int:
        row = self._run(lambda db: db.execute("SELECT COUNT(*) FROM responses WHERE expires_at > ?",
                                              (self._clock(),)).fetchone())
        return row[0] if row else 0

    # ---- the connection -------------------------------------------------------------------

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """`work(connection)`; None (logged) when the database fails, whose connection is then
        dropped so that the next access opens it again."""
        try:
            return work(self._open())
        except sqlite3.Error as exc:
            logger.error("response store %s failed: %s: %s; treated as empty", self._path(), type(exc).__name__, exc)
            self._close_connection()
            return None

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            path = self._path()
            if self.directory is not None and not os.path.isdir(self.directory):
                raise sqlite3.OperationalError(f"the store directory {self.directory} does not exist")
            db = sqlite3.connect(path, timeout=self.timeout_s, check_same_thread=False)
            try:
                if self.directory is not None:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last writes, never corrupt
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._connection = db
        return self._connection

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _path(self) -> str:
        return ":memory:" if self.directory is None else os.path.join(self.directory, DATABASE_FILE)
