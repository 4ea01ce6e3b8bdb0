"""Where progress lines go: a ``Log`` is any ``str -> None`` sink.

Every long-running function takes ``log=`` (default :func:`stderr_log`), so the command
line prints progress, tests pass :func:`silent`, and a caller may collect lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def silent(message: str) -> None:
    pass
