"""Routing hints in comments: `/* pgshard: shard=2 */`, `/* pgshard: key=42 */`, `-- pgshard: ...`.

A hint is the application's way to route what the analysis cannot (a statement sqlglot cannot
parse, a function call that writes) or to pin a statement to a shard on purpose. Hints live in
comments so the statement stays valid SQL for PostgreSQL and for any other proxy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_ITEM = re.compile(r"""([A-Za-z_]+)\s*=\s*('(?:[^']|'')*'|"(?:[^"]|"")*"|[^\s,;]+)""")


@dataclass(frozen=True, slots=True)
class Hint:
    shard: int | None = None
    key: str | None = None  # the shard-key value, as text
    error: str | None = None  # a malformed hint is refused, never ignored


NO_HINT = Hint()


def parse_hints(hints: Sequence[bytes | str]) -> Hint:
    """Read `shard=N` and `key=V` (V may be quoted) from hint bodies; the last one wins."""
    if not hints:
        return NO_HINT
    shard: int | None = None
    key: str | None = None
    for raw in hints:
        body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        for name, value in _ITEM.findall(body):
            name = name.lower()
            if value[:1] in ("'", '"'):
                value = value[1:-1].replace(value[0] * 2, value[0])
            if name == "shard":
                if not value.isdigit():
                    return Hint(error=f"pgshard hint shard={value!r} is not a shard number")
                shard = int(value)
            elif name in ("key", "sharding_key"):
                key = value
            else:
                return Hint(error=f"unknown pgshard hint {name!r} (known: shard, key)")
        if not _ITEM.search(body):
            return Hint(error=f"malformed pgshard hint {body!r} (expected shard=N or key=V)")
    return Hint(shard, key)
