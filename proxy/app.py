"""The running proxy: the listener, the pools it owns, the cancel keys it issued, its maintenance loop.

One ProxyApp per worker process. Pools are created on first use per (database, user, shard) and
live as long as the process; the janitor closes idle and old server connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
from typing import TYPE_CHECKING

from pooler.pool import Pool, PoolSettings
from pooler.server_connection import ServerTarget
from proxy import janitor, native
from proxy.config import Config
from proxy.log import log

if TYPE_CHECKING:
    from proxy.session import ClientSession
    from router.routing import Router


def raise_open_files_limit(wanted: int) -> int:
    """Room for max_client_conn clients plus their server connections (RLIMIT_NOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ProxyApp:
    """State shared by every client session of one worker."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[tuple[str, str, int], Pool] = {}
        self.clients: set[ClientSession] = set()
        self.client_count = 0
        self.pinned_clients = 0
        self.cancel_keys: dict[int, ClientSession] = {}
        self.ssl_context = self._ssl_context()
        self.routers: dict[str, Router | None] = {}
        self.coordinators: dict[str, janitor.Coordinator] = {}
        self.server: asyncio.Server | None = None
        self._janitor: asyncio.Task[None] | None = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        general = self.config.general
        if not general.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(general.tls_cert), str(general.tls_key))
        return context

    # pools ------------------------------------------------------------------------------------------
    def pool_for(self, database: str, user: str, shard: int) -> Pool:
        key = (database, user, shard)
        pool = self.pools.get(key)
        if pool is None:
            pool = self._make_pool(database, user, shard)
            self.pools[key] = pool
        return pool

    def _make_pool(self, database_name: str, user_name: str, shard_index: int) -> Pool:
        database = self.config.database(database_name)
        user = self.config.user(user_name)
        assert database is not None and user is not None
        address = database.shards[shard_index].address
        target = ServerTarget(
            host=address.host,
            port=address.port,
            user=user.server_user or address.user,
            password=user.server_password if user.server_user else address.password,
            dbname=address.dbname,
        )
        general = self.config.general
        settings = PoolSettings(
            size=user.pool_size,
            min_size=user.min_pool_size,
            query_wait_timeout=general.query_wait_timeout,
            idle_timeout=general.server_idle_timeout,
            lifetime=general.server_lifetime,
            connect_timeout=general.connect_timeout,
        )
        return Pool(f"{database_name}/{user_name}/shard{shard_index}", target, settings)

    def router_for(self, database_name: str) -> Router | None:
        """The database's router, or None for a single-shard database: a plain pooler routes nothing."""
        if database_name not in self.routers:
            database = self.config.database(database_name)
            assert database is not None
            router = None
            if len(database.shards) > 1:
                from router.routing import Router
                from router.topology import Topology

                router = Router(Topology.from_database(database))
            self.routers[database_name] = router
        return self.routers[database_name]

    # clients ----------------------------------------------------------------------------------------
    def client_connected(self, session: ClientSession) -> None:
        self.clients.add(session)
        self.client_count += 1

    def client_disconnected(self, session: ClientSession) -> None:
        self.clients.discard(session)
        self.client_count -= 1
        if session.user:
            log.info("client disconnected", peer=session.peer, user=session.user, database=session.database)
        if session.pid and self.cancel_keys.get(session.pid) is session:
            del self.cancel_keys[session.pid]

    def over_client_limit(self) -> bool:
        return self.client_count > self.config.general.max_client_conn

    def register_cancel_key(self, session: ClientSession) -> tuple[int, int]:
        from proxy.session import new_cancel_key

        while True:
            pid, secret = new_cancel_key()
            if pid not in self.cancel_keys:
                self.cancel_keys[pid] = session
                return pid, secret

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest: forwarded only if the key is one we issued and its query is running now."""
        session = self.cancel_keys.get(pid)
        if session is not None and session.secret == secret:
            session.cancel_running_query()

    # serving ----------------------------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        from proxy.routed_session import RoutedSession as ClientSession

        general = self.config.general
        raise_open_files_limit(general.max_client_conn * 2 + 1024)
        for database in self.config.databases:
            self.router_for(database.name)  # sqlglot and the route cache load now, not at a first login
        await janitor.refresh_catalogs(self, startup=True)
        await janitor.prepare_two_phase(self)
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(lambda: ClientSession(self), sock=sock, backlog=4096)
        else:
            self.server = await loop.create_server(
                lambda: ClientSession(self),
                general.host,
                general.port,
                reuse_address=True,
                reuse_port=general.workers > 1,
                backlog=4096,
            )
        self._janitor = loop.create_task(janitor.run(self))
        log.info(
            "listening",
            listen=general.listen,
            pool_mode=general.pool_mode,
            workers=general.workers,
            compiled=bool(native.compiled_modules()),
        )
        stale = native.stale_modules()
        if stale:
            log.warning("compiled modules are older than their sources; reinstall pgshard", modules=stale)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._janitor is not None:
            self._janitor.cancel()
        for session in list(self.clients):
            if session.transport is not None:
                session.transport.close()
        for pool in self.pools.values():
            pool.close()
        if self.server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5)
