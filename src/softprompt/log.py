"""The library's log: what a run says while it works (not a command's results).

Lines go to the `softprompt` logger: progress at INFO, notices (e.g. a slower path taken) at
WARNING. The command line shows them as plain lines; a Python user sees them the same way unless
logging is configured, in which case the configuration decides (e.g.
`logging.getLogger("softprompt").setLevel("WARNING")` silences the progress lines).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

logger = logging.getLogger("softprompt")
_OURS = "_softprompt_handler"


def show_log(info: TextIO | None = None) -> None:
    """Show the log as plain lines: INFO on `info` (default: the current sys.stdout), WARNING
    and above on the current sys.stderr."""
    for h in [h for h in logger.handlers if getattr(h, _OURS, False)]:
        logger.removeHandler(h)
    low = logging.StreamHandler(info or sys.stdout)
    low.addFilter(lambda r: r.levelno < logging.WARNING)
    high = logging.StreamHandler(sys.stderr)
    high.setLevel(logging.WARNING)
    for h in (low, high):
        h.setFormatter(logging.Formatter("%(message)s"))
        setattr(h, _OURS, True)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def ensure_visible() -> None:
    """Where nobody configured logging, show the log as `print` would."""
    if not logger.hasHandlers():
        show_log()
