"""The compiled hot path: built by `pip install` on this machine, and never silently out of date."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from proxy import native

pure = pytest.mark.skipif(
    bool(os.environ.get("PGSHARD_PURE_PYTHON")), reason="installed with PGSHARD_PURE_PYTHON: nothing compiled"
)


@pure
def test_every_hot_path_module_runs_compiled() -> None:
    expected = [path.removesuffix(".py").replace("/", ".") for path in native.HOT_PATH]
    assert native.compiled_modules() == expected


@pure
def test_a_source_edited_after_the_build_is_reported_stale() -> None:
    spec = importlib.util.find_spec("proxy.prepared")
    assert spec is not None and spec.origin is not None
    built = Path(spec.origin).stat().st_mtime
    source = Path(native.__file__).with_name("prepared.py")
    before = source.stat()
    assert native.stale_modules() == []
    try:
        os.utime(source, (before.st_atime, built + 10))
        assert native.stale_modules() == ["proxy.prepared"]
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert native.stale_modules() == []
