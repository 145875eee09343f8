"""Routing tables and alerts for tests that run a real daemon and change its table while it runs."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_serial = itertools.count(1)


def paper_table(journal: Path, to: str = "a", *, note: str = "", slippage_a: int = 5, port: int | None = None,
                extra: str = "") -> str:
    """Two paper plugins, `a` and `b`; route `main` sends every alert to `to`.

    `note` changes the text (and so the version) without changing the routing; `extra` is
    YAML added at the top level (security:, defaults:, ...)."""
    return f"""\
version: 1
server:
  journal: {journal}
  {f"port: {port}" if port is not None else ""}
{extra}
plugins:
  a: {{type: paper, slippage_bps: {slippage_a}}}
  b: {{type: paper}}
routes:
  - name: main
    to: {to}
# {note}
"""


def alert(**fields: Any) -> dict[str, Any]:
    """A valid alert, distinct from every other one this process made (so never a duplicate)."""
    return {"symbol": "BTC/USDT", "action": "buy", "quantity": 0.01, "tag": f"{os.getpid()}-{next(_serial)}",
            **fields}


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called `name`."""
    return [dict(s.labels) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
