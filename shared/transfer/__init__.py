"""KV transfer between a prefill and a decode engine: `KvHandle`, `TransferConnector`, backends.

Control over ZeroMQ, data over UCX (ucxx) or NCCL (torch.distributed P2P). See connector.py for
the engine contract and docs/architecture.md for the cache layout the transfers rely on.
"""

from .config import TransferConfig
from .events import ConnectorEvents
from .handle import KV_HANDLE_VERSION, KvHandle, KvHandleError, KvLayout, layout_hash, layout_mismatch

__all__ = ["TransferConnector", "ConnectorEvents", "KvHandle", "KvHandleError", "KV_HANDLE_VERSION",
           "TransferConfig", "layout_hash", "KvLayout", "layout_mismatch"]


def __getattr__(name):  # TransferConnector pulls torch and zmq: import it only when asked
    if name == "TransferConnector":
        from .connector import TransferConnector
        return TransferConnector
    raise AttributeError(name)
