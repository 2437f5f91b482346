"""How the long-running verbs show progress: a library module's INFO records, as bare lines on stdout.

The library logs its progress (`[stage1] reusing finished run in ...`); the command line decides
that a person is watching and shows those records as plain lines, everything else at WARNING.
"""

from __future__ import annotations

import logging
import sys


def show_progress(*loggers: str) -> None:
    """WARNING and above from everything (as before); INFO from `loggers` as bare stdout lines."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in loggers:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
