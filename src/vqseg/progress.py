"""One progress-bar policy for every long loop: live on a terminal, a line every 30 s in a log file."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, disable: bool = False, initial: int = 0) -> tqdm:
    """Redirected output (benchmark suites, nohup) gets sparse lines rather than thousands of updates."""
    return tqdm(
        total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
