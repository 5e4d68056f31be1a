"""Errors from server connections and pools, raised and caught across the whole proxy.

They live apart from the modules that raise them because those are compiled (proxy/native.py),
and plain Python subclasses such as router.scatter.QueryTimeout cannot extend a compiled class.
"""

from __future__ import annotations


class ServerError(Exception):
    """The server refused us or broke: carries the fields a client should see (SQLSTATE first)."""

    def __init__(self, sqlstate: str, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.fields = fields or {}


class PoolTimeout(ServerError):
    """No server connection became free within query_wait_timeout."""
