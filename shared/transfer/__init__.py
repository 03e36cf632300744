"""KV transfer between a prefill and a decode engine: `KvHandle`, `KVConnector`, backends.

Control over ZeroMQ, data over UCX (ucxx) or NCCL (torch.distributed P2P). See connector.py for
the engine contract and docs/architecture.md for the cache layout the transfers rely on.
"""

from .config import TransferConfig
from .events import ConnectorEvents
from .handle import KV_HANDLE_VERSION, KvHandle, KvHandleError, layout_hash

__all__ = ["KVConnector", "ConnectorEvents", "KvHandle", "KvHandleError", "KV_HANDLE_VERSION",
           "TransferConfig", "layout_hash"]


def __getattr__(name):  # KVConnector pulls torch and zmq: import it only when asked
    if name == "KVConnector":
        from .connector import KVConnector
        return KVConnector
    raise AttributeError(name)
