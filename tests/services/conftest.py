"""Fixtures shared by the gateway test modules of this directory."""

from __future__ import annotations

import pytest

from scripted_tools import tool_stack


@pytest.fixture(scope="session")
def scripted_stack():
    """(gateway, scripted worker, tokenizer): the tool-calling stack of scripted_tools.py, one for
    test_gateway_tools.py and test_gateway_responses.py. Every test reads the worker's record right
    after its own requests (or counts from before them), so sharing it hides nothing. The response
    store holds 2 responses, as test_gateway_responses.py always had it."""
    with tool_stack(response_store_size=2) as parts:
        yield parts
