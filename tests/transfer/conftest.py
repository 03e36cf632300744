"""Fixtures for transfer tests: real connector processes over real sockets.

`ucx_pair` is session-scoped (starting a process with torch + ucxx costs seconds on a loaded
box): one prefill and one decode connector, UCX over loopback TCP. Tests that write into the
decode side's cache compare against a snapshot they take first, so they do not depend on order.
"""

from __future__ import annotations

import pytest

from splitserve.shared.auth import control_key

from .peer import Peer

TEST_SECRET = b"transfer-tests-shared-secret-0123456789"
"""The pair's shared secret: their control messages are signed with a key derived from it."""
CONTROL_KEY = control_key(TEST_SECRET)
PREFILL_LEASE_S = 3.0
PREFILL_TIMEOUT_S = 5.0
DECODE_TIMEOUT_S = 3.0


@pytest.fixture(scope="session")
def ucx_pair():
    prefill = Peer(1, role="prefill", backend="ucx", ucx_tls="tcp", model_id="tiny",
                   timeout_s=PREFILL_TIMEOUT_S, lease_s=PREFILL_LEASE_S, secret=TEST_SECRET)
    decode = Peer(2, role="decode", backend="ucx", ucx_tls="tcp", model_id="tiny",
                  timeout_s=DECODE_TIMEOUT_S, secret=TEST_SECRET)
    try:
        yield prefill.ready(), decode.ready()
    finally:
        prefill.close()
        decode.close()
