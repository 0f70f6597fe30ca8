"""``ConfigError`` and its message format: the key, the value, the problem and the fix."""
from __future__ import annotations

from typing import Any

class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and the fix."""


# package-internal: loading and validation word their errors alike
def _err(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"config error: {key}={value!r}: {problem}. Fix: {fix}")

