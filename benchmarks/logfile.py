"""Where a benchmark's report goes: the terminal, and its log under benchmarks/logs/ (committed)."""

from __future__ import annotations

from pathlib import Path


def emit(text: str, log: Path) -> None:
    print(text)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
