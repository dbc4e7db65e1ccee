"""What the Python API is made of: option objects and reports.

- An operation's options are a dataclass whose fields are their real names and types,
  checked when it is made (`ExtractOptions`, `ScanOptions`, `ScoreOptions`,
  `ReportOptions`, `ExportOptions`, `OutlierOptions`). `options_from` builds one from
  keyword arguments, so a misspelled name is a one-line `StoreError` naming the known
  ones, never a `TypeError` traceback from deep inside.
- Every result a `Store` method returns is a `Report`: a dataclass whose `as_dict()` is
  what `--json` prints.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from embstore.errors import StoreError

T = TypeVar("T")


def options_from(cls: type[T], what: str, kwargs: dict[str, Any], error: type[StoreError] = StoreError) -> T:
    """`cls(**kwargs)`, where an unknown name is a one-line `error` listing the known ones
    (the value checks are `cls`'s own, in its `__post_init__`)."""
    known = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise error(f"unknown {what} option(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: reports and outcomes by their `as_dict()`."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Report:
    """The base of every result a `Store` method returns: a dataclass; `as_dict()` is its
    JSON form. Subclasses with derived figures extend `as_dict`."""

    def as_dict(self) -> dict[str, Any]:
        if not is_dataclass(self):
            raise TypeError(f"{type(self).__name__} is a Report but not a dataclass")
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


__all__ = ["options_from", "plain", "Report"]
