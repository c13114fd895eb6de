"""Request ids: in answers' x-request-id, usage rows and the audit log."""

from __future__ import annotations

import itertools
import os

_PREFIX = "req_" + os.urandom(6).hex()
_numbers = itertools.count(1)


def new_request_id() -> str:
    """Unique per gateway process start, without a syscall per request."""
    return f"{_PREFIX}{next(_numbers):010x}"
