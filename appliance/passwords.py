"""Passwords: stored only as Argon2id hashes (a memory-hard hash, argon2-cffi).

Parameters are argon2-cffi's defaults, the RFC 9106 "second recommended" profile:
64 MiB of memory, 3 passes, 4 lanes, a 16-byte random salt and a 32-byte tag, about
50 ms on one core of a current server. The parameters are recorded in each hash, so
hashes made with older ones still verify; `needs_rehash` says when to store a new one.
Hashing is CPU- and memory-heavy: call these on a worker thread, never on the event loop.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from appliance.errors import InvalidRequest

MIN_LENGTH = 8
MAX_LENGTH = 1024  # longer input only costs hashing time

_hasher = PasswordHasher()  # Argon2id, RFC 9106 low-memory profile


@functools.cache  # made on first use, not at import: every CLI call would pay for it
def decoy_hash() -> str:
    """Verified against when there is no hash to verify (an unknown user), so a wrong name and a
    wrong password take the same time. The gateway makes it at start (appliance/auth.py)."""
    return _hasher.hash("decoy password, never valid")


def check_password(password: str, *, param: str = "password") -> None:
    """A password the appliance accepts: MIN_LENGTH to MAX_LENGTH characters."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidRequest(f"a password needs {MIN_LENGTH} to {MAX_LENGTH} characters", param=param)


def hash_password(password: str) -> str:
    """The Argon2id hash to store, in the PHC string format ($argon2id$v=19$m=...,t=...,p=...$salt$tag)."""
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches the `stored` hash (compared in constant time by libargon2).
    No hash (an unknown user or one without a password) is False after the same work."""
    try:
        return _hasher.verify(stored or decoy_hash(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether `stored` was made with other parameters than today's (rehash it at the next sign-in)."""
    return _hasher.check_needs_rehash(stored)
