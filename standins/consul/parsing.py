"""Parsing helpers: Go durations, Consul's lenient JSON keys and query flags, and the API's error answer."""

from __future__ import annotations

import re
from typing import Any

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class ApiError(Exception):
    """An HTTP error answer: Consul replies with a status code and a plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_duration(value: object) -> float:
    """Seconds from a Go duration string ("10s", "500ms", "1m30s") or a JSON number of nanoseconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ApiError(400, f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    text = str(value).strip()
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ApiError(400, f'time: invalid duration "{text}"')
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """Go's time.Duration String() for the whole-millisecond values checks use."""
    if seconds <= 0:
        return ""
    millis = round(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    hours, rest_ms = divmod(millis, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:g}s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def normalized(body: dict[str, Any]) -> dict[str, Any]:
    """Consul decodes JSON keys case-insensitively and accepts snake_case aliases; so does this."""
    return {key.replace("_", "").lower(): value for key, value in body.items()}


def truthy_flag(query: dict[str, list[str]], name: str) -> bool:
    """Consul treats a present query flag (``?recurse``, ``?passing``) as true unless it says false."""
    if name not in query:
        return False
    return query[name][-1].lower() not in ("false", "0")
