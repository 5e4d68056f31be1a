"""The relay's hot path, compiled with mypyc from these same sources when pgshard is installed.

Profiles of `pgbench -S` through pgshard showed the interpreter itself (attribute lookups, calls,
frames) as the largest user-space cost of the single-shard path (issue 10), so setup.py compiles
the modules named here into C extensions; everything else stays plain Python. The sources stay the
only code: with PGSHARD_PURE_PYTHON=1 at install time nothing is compiled and the same modules run
interpreted. A compiled module shadows its .py file, so an edit after the build is not seen until
the next `pip install`: `stale_modules` says when that is the case (the tests and `pgshard run`
check it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HOT_PATH = (
    "proxy/session.py",
    "proxy/routed_session.py",
    "proxy/prepared.py",
    "proxy/varcache.py",
    "proxy/protocol/framing.py",
    "pooler/pool.py",
    "pooler/server_connection.py",
    "parser/statements.py",
    "parser/session_statements.py",
)

_ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def compiled_modules() -> list[str]:
    """The hot-path modules that would load compiled (their import resolves to an extension)."""
    found = []
    for path in HOT_PATH:
        spec = importlib.util.find_spec(_module_name(path))
        if spec is not None and spec.origin is not None and not spec.origin.endswith(".py"):
            found.append(_module_name(path))
    return found


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after the build: the compiled code is what runs.

    Only a source tree (an editable install) can be stale; an installed wheel is one build.
    """
    stale: list[str] = []
    if not (_ROOT / "setup.py").exists():
        return stale
    for path in HOT_PATH:
        source = _ROOT / path
        spec = importlib.util.find_spec(_module_name(path))
        if spec is None or spec.origin is None or spec.origin.endswith(".py") or not source.exists():
            continue
        if source.stat().st_mtime > Path(spec.origin).stat().st_mtime:
            stale.append(_module_name(path))
    return stale
