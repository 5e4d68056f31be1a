"""Builds pgshard, compiling the relay's hot path (proxy/native.py, HOT_PATH) with mypyc.

The compiled modules are the same sources, so PGSHARD_PURE_PYTHON=1 skips this step and pgshard
runs interpreted, only slower; metadata and everything else live in pyproject.toml.
"""

import os
import runpy

from setuptools import setup


def ext_modules() -> list:
    if os.environ.get("PGSHARD_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    hot_path = runpy.run_path(os.path.join("proxy", "native.py"))["HOT_PATH"]
    return mypycify(list(hot_path), opt_level="3", debug_level="0", group_name="pgshard_native")


setup(ext_modules=ext_modules())
