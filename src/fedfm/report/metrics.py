"""metrics.jsonl: one JSON line per round, appended and flushed as rounds complete."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/Inf
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(_clean(record)) + "\n")
        f.flush()


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill mid-write: everything after it is lost anyway
    return out


def truncate_after(path: Path, last_round: int) -> None:
    """Keep the lines of rounds <= ``last_round`` (those covered by the checkpoint)."""
    kept = [r for r in read_lines(path) if r["round"] <= last_round]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
