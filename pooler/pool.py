"""A pool of server connections for one (database, user, shard): bounded, with a fair wait queue.

The fast path is synchronous: `try_acquire` hands out an idle connection without a coroutine, and
`release` gives a returned connection straight to the longest waiter. Idle connections are reused
last-in first-out (as PgBouncer does by default), which keeps a few backends warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from pooler.background import spawn
from pooler.errors import PoolTimeout, ServerError
from pooler.log import log
from pooler.server_connection import ServerConnection, ServerTarget, open_server_connection


@dataclass(frozen=True, slots=True)
class PoolSettings:
    size: int
    min_size: int
    query_wait_timeout: float
    idle_timeout: float
    lifetime: float
    connect_timeout: float


class Pool:
    """Server connections for one shard, shared by every client of one (database, user)."""

    def __init__(self, name: str, target: ServerTarget, settings: PoolSettings) -> None:
        self.name = name
        self.target = target
        self.settings = settings
        self._idle: deque[ServerConnection] = deque()
        self._busy: set[ServerConnection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[ServerConnection]] = deque()
        # ParameterStatus values of a real backend, replayed to clients at their login.
        self.server_parameters: dict[str, str] = {}
        self.closed = False

    # counts, for logs now and the admin console later ------------------------------------------------
    @property
    def size(self) -> int:
        return len(self._idle) + len(self._busy) + self._opening

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    @property
    def waiting_count(self) -> int:
        return len(self._waiters)

    def connections(self) -> Iterator[ServerConnection]:
        yield from self._idle
        yield from self._busy

    # acquire / release ---------------------------------------------------------------------------------
    def try_acquire(self) -> ServerConnection | None:
        """An idle connection right now, or None (the caller then awaits `acquire`)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            self._busy.add(conn)
            return conn
        return None

    async def acquire(self) -> ServerConnection:
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if self.closed:
            raise ServerError("08006", f"pool {self.name} is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ServerConnection] = loop.create_future()
        self._waiters.append(waiter)
        if self.size < self.settings.size:
            self._start_grow()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.settings.query_wait_timeout)
        except TimeoutError:
            self._abandon(waiter)
            raise PoolTimeout(
                "08P01",
                f"query_wait_timeout: no server connection to {self.target.label} became free "
                f"within {self.settings.query_wait_timeout:g}s",
            ) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: asyncio.Future[ServerConnection]) -> None:
        """A waiter gave up; a connection it was handed meanwhile goes back to the pool."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release(waiter.result())

    def _start_grow(self) -> None:
        """Count the connection as opening now, so a burst of waiters cannot overshoot pool_size."""
        self._opening += 1
        spawn(self._grow())

    async def _grow(self) -> None:
        try:
            conn = await open_server_connection(self.target, self.settings.connect_timeout)
            conn.pool = self
        except ServerError as exc:
            self._opening -= 1
            log.warning("server connection failed", pool=self.name, error=exc.message)
            # Fail one waiter with the reason, so a dead server is reported, not waited on.
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
                    break
            return
        self._opening -= 1
        log.info("server connected", pool=self.name, backend_pid=conn.backend_pid)
        if not self.server_parameters:
            self.server_parameters = dict(conn.parameters)
        self._busy.add(conn)
        self.release(conn)

    def release(self, conn: ServerConnection) -> None:
        """Take a clean (ReadyForQuery 'I') connection back; the longest waiter gets it first."""
        conn.sink = None
        conn.last_used = time.monotonic()
        if conn.closed or self.closed or conn.last_used - conn.created_at > self.settings.lifetime:
            self.discard(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._busy.discard(conn)
        self._idle.append(conn)

    def discard(self, conn: ServerConnection) -> None:
        """Close a connection that cannot be reused; open a replacement if clients are waiting."""
        self._busy.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        conn.close()
        log.info("server closed", pool=self.name, backend_pid=conn.backend_pid)
        if self._waiters and not self.closed and self.size < self.settings.size:
            self._start_grow()

    async def ensure_parameters(self) -> dict[str, str]:
        """The server's ParameterStatus values, connecting once if the pool has never connected."""
        if not self.server_parameters:
            conn = await self.acquire()
            if not self.server_parameters:
                self.server_parameters = dict(conn.parameters)
            self.release(conn)
        return self.server_parameters

    # maintenance, called by the janitor ----------------------------------------------------------------
    def reap_idle(self, now: float) -> None:
        """Close connections idle past server_idle_timeout or older than server_lifetime."""
        keep: deque[ServerConnection] = deque()
        excess = len(self._idle) + len(self._busy) - self.settings.min_size
        for conn in self._idle:
            too_old = now - conn.created_at > self.settings.lifetime
            too_idle = now - conn.last_used > self.settings.idle_timeout
            if conn.closed or ((too_old or too_idle) and excess > 0):
                conn.close()
                excess -= 1
            else:
                keep.append(conn)
        self._idle = keep

    async def fill_min(self) -> None:
        while not self.closed and self.size < self.settings.min_size:
            self._opening += 1
            await self._grow()
            if not self._idle:
                return

    def close(self) -> None:
        self.closed = True
        for conn in list(self.connections()):
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ServerError("08006", f"pool {self.name} is closed"))
