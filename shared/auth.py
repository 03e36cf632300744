"""The stack's shared secret and what is derived from it: one key per internal plane.

`splitserve up` draws a random secret, writes it to a 0600 file and hands every process the
file's path (`--secret-file`, or SPLITSERVE_SECRET_FILE): never the secret itself on a command
line, where `ps` shows it. Each plane uses its own key derived from the secret, so a key that
leaks from one plane (the gRPC token travels in metadata) does not open another:

    control_key  HMAC-SHA256 key of every ZeroMQ control message (shared/transfer/control.py)
    grpc_token   bearer token the gateway sends and the workers check (shared/grpc_security.py)

No secret (a worker started by hand): the planes are unauthenticated, and a warning says so.
Standard library only: the gateway imports it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat

logger = logging.getLogger(__name__)

SECRET_FILE_ENV = "SPLITSERVE_SECRET_FILE"
SECRET_BYTES = 32
MAC_BYTES = 32  # SHA-256


class SecretFileError(ValueError):
    """The secret file is missing, empty or readable by others; the message says which."""


def read_secret_file(path: str) -> bytes:
    """The secret in `path`; refuses a file that group or others may read (like ssh keys)."""
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise SecretFileError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(f"secret file {path} is accessible by group or others "
                              f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if len(secret) < 16:
        raise SecretFileError(f"secret file {path} holds {len(secret)} bytes; 16 or more are needed")
    return secret


def write_secret_file(path: str) -> None:
    """A new random secret in `path`, created 0600 (never readable by anyone else, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES))


def secret_from_args(args) -> bytes | None:
    """The secret named by `--secret-file` (default: $SPLITSERVE_SECRET_FILE), or None."""
    path = getattr(args, "secret_file", None) or os.environ.get(SECRET_FILE_ENV)
    return read_secret_file(path) if path else None


def derive_key(secret: bytes | None, purpose: str) -> bytes | None:
    if secret is None:
        return None
    return hmac.new(secret, f"splitserve/{purpose}/v1".encode(), hashlib.sha256).digest()


def control_key(secret: bytes | None) -> bytes | None:
    return derive_key(secret, "zmq-control")


def grpc_token(secret: bytes | None) -> str | None:
    key = derive_key(secret, "grpc")
    return key.hex() if key is not None else None


def mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def mac_ok(key: bytes, body: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(key, body), tag)


def warn_if_open(secret: bytes | None, what: str) -> None:
    if secret is None:
        logger.warning("%s: no --secret-file given, so its internal planes (gRPC, ZeroMQ control) are "
                       "unauthenticated: anyone who reaches its ports can call it", what)
