"""The pooler's logger: the same structlog logger as the proxy's, without importing proxy."""

from __future__ import annotations

from typing import Any

import structlog

log: Any = structlog.get_logger("pgshard")
