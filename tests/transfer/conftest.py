"""Fixtures for transfer tests: real connector processes over real sockets.

`ucx_pair` is session-scoped (starting a process with torch + ucxx costs seconds on a loaded
box): one prefill and one decode connector, UCX over loopback TCP. Tests that write into the
decode side's cache compare against a snapshot they take first, so they do not depend on order.
"""

from __future__ import annotations

import pytest

from .peer import Peer

PREFILL_LEASE_S = 3.0
PREFILL_TIMEOUT_S = 5.0
DECODE_TIMEOUT_S = 3.0


@pytest.fixture(scope="session")
def ucx_pair():
    prefill = Peer(1, role="prefill", backend="ucx", ucx_tls="tcp", model_id="tiny",
                   timeout_s=PREFILL_TIMEOUT_S, lease_s=PREFILL_LEASE_S)
    decode = Peer(2, role="decode", backend="ucx", ucx_tls="tcp", model_id="tiny",
                  timeout_s=DECODE_TIMEOUT_S)
    try:
        yield prefill.ready(), decode.ready()
    finally:
        prefill.close()
        decode.close()
