"""ZeroMQ control plane: which blocks go where, accepted/rejected, done/failed.

The prefill side binds one ROUTER (`ControlServer`) at its handle's `control_address`; the decode
side keeps one DEALER per prefill address (`ControlClient`). Messages are small JSON dicts with a
`type` and the `transfer_id` they belong to:

    decode -> prefill   load {request_id, prefill_instance_id, decode_instance_id, layout_hash,
                              src_block_ids, dst_block_ids, tag, data_address}
                        done {request_id, prefill_instance_id}     (prefill may free the blocks)
                        failed {request_id, prefill_instance_id, reason}
    prefill -> decode   accepted {num_runs} | rejected {reason} | send_failed {reason}

Everything here runs on the connector's asyncio loop thread. A DEALER whose peer does not answer
in time is closed with linger 0 and dropped, so nothing queued for a vanished peer survives.
"""

from __future__ import annotations

import asyncio
import json
import logging

import zmq
import zmq.asyncio

logger = logging.getLogger(__name__)

CONTROL_VERSION = 1


def encode(msg: dict) -> bytes:
    return json.dumps({"v": CONTROL_VERSION, **msg}).encode()


def decode(frame: bytes) -> dict:
    msg = json.loads(frame)
    if not isinstance(msg, dict) or msg.get("v") != CONTROL_VERSION or "type" not in msg:
        raise ValueError(f"control message of unknown version or shape: {frame[:200]!r}")
    return msg


class ControlServer:
    """Prefill side: a ROUTER that receives load/done/failed and answers the sender."""

    def __init__(self, zctx: zmq.asyncio.Context, host: str, port: int):
        self._sock = zctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port == 0:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
        self.address = f"tcp://{host}:{port}"

    async def recv(self) -> tuple[bytes, dict | None]:
        """(peer identity, message); message None if it was malformed (logged)."""
        peer, frame = await self._sock.recv_multipart()
        try:
            return peer, decode(frame)
        except ValueError as exc:
            logger.warning("dropping malformed control message: %s", exc)
            return peer, None

    def reply(self, peer: bytes, msg: dict) -> None:
        try:  # a ROUTER drops messages for unknown peers; never block the loop on a slow one
            self._sock.send_multipart([peer, encode(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("control reply to a peer dropped (queue full): %s", msg.get("type"))

    def close(self) -> None:
        self._sock.close(linger=0)


class ControlClient:
    """Decode side: one DEALER per prefill control address; replies routed by transfer_id."""

    def __init__(self, zctx: zmq.asyncio.Context):
        self._zctx = zctx
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._inboxes: dict[str, asyncio.Queue] = {}

    def open_inbox(self, transfer_id: str) -> asyncio.Queue:
        """Messages the prefill side sends about `transfer_id` land in this queue."""
        self._inboxes[transfer_id] = asyncio.Queue()
        return self._inboxes[transfer_id]

    def inbox(self, transfer_id: str) -> asyncio.Queue | None:
        return self._inboxes.get(transfer_id)

    def close_inbox(self, transfer_id: str) -> None:
        self._inboxes.pop(transfer_id, None)

    def send(self, address: str, msg: dict) -> None:
        """Queues `msg` to the prefill at `address` without waiting (ZMQ connects lazily)."""
        try:
            self._dealer(address).send(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("control message to %s dropped (queue full): %s", address, msg.get("type"))

    def drop(self, address: str) -> None:
        """Forgets the connection to a peer that failed to answer (it may have vanished)."""
        sock = self._dealers.pop(address, None)
        reader = self._readers.pop(address, None)
        if reader:
            reader.cancel()
        if sock:
            sock.close(linger=0)
            logger.info("dropped control connection to %s", address)

    def close(self) -> None:
        for address in list(self._dealers):
            self.drop(address)

    def _dealer(self, address: str) -> zmq.asyncio.Socket:
        if address not in self._dealers:
            sock = self._zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._dealers[address] = sock
            self._readers[address] = asyncio.ensure_future(self._read(address, sock))
        return self._dealers[address]

    async def _read(self, address: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frame = await sock.recv()
            try:
                msg = decode(frame)
            except ValueError as exc:
                logger.warning("dropping malformed control message from %s: %s", address, exc)
                continue
            inbox = self._inboxes.get(msg.get("transfer_id", ""))
            if inbox is not None:
                inbox.put_nowait(msg)
