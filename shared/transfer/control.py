"""ZeroMQ control plane: which blocks go where, accepted/rejected, done/failed.

The prefill side binds one ROUTER (`ControlServer`) at its handle's `control_address`; the decode
side keeps one DEALER per prefill address (`ControlClient`). Messages are small JSON dicts with a
`type` and the `transfer_id` they belong to:

    decode -> prefill   load {request_id, prefill_instance_id, decode_instance_id, layout_hash,
                              src_block_ids, dst_block_ids, tag, data_address, layout}
                        describe {}                  (a handle's layout hash is not ours: why?)
                        done {request_id, prefill_instance_id}     (prefill may free the blocks)
                        failed {request_id, prefill_instance_id, reason}
    prefill -> decode   accepted {num_runs, data_address} | rejected {reason} | send_failed {reason}
                        layout {layout}              (the answer to describe: our KvLayout)

`layout` is the sender's `KvLayout` (handle.py): wire fields, tensor-parallel size, heads per rank.

`data_address` is each side's data-plane address (the UCX worker address, the NCCL rank): the
data planes connect only to peers named in authenticated control messages.

Every message is one ZeroMQ frame: HMAC-SHA256(control key, body) || body, the body a JSON
object whose fields are checked against `_FIELDS` by type. The key is derived from the stack's
shared secret (shared/auth.py): an outsider who reaches the socket cannot forge or alter
load/done/failed. HMAC rather than CURVE: the stack already shares one secret (the gRPC plane
uses it too), so there is no key pair per process to distribute, and ROUTER identities and the
lazy reconnects work unchanged. Control messages carry no secrets, so they are authenticated,
not encrypted. Replays are harmless: a replayed `load` finds the hold already loading, a
replayed `done`/`failed` names a transfer id that is no longer current.

A message that fails any check (wrong frame count, bad MAC, not JSON, a field of the wrong type,
over MAX_MESSAGE_BYTES, which ZeroMQ enforces by dropping the connection) is dropped and
counted in `dropped`; the socket's task goes on serving.

Everything here runs on the connector's asyncio loop thread. A DEALER whose peer does not answer
in time is closed with linger 0 and dropped, so nothing queued for a vanished peer survives.
"""

from __future__ import annotations

import asyncio
import json
import logging

import zmq
import zmq.asyncio

from splitserve.shared.auth import MAC_BYTES, mac, mac_ok

logger = logging.getLogger(__name__)

CONTROL_VERSION = 2
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""A load of 100k blocks is ~1.5 MB of JSON; a peer sending more is disconnected by ZeroMQ."""
_IDS = "ids"  # a list of non-negative ints
_ID, _OPT = str, (str, type(None))
_FIELDS = {
    "load": {"transfer_id": _ID, "request_id": _ID, "prefill_instance_id": _ID, "decode_instance_id": _ID,
             "layout_hash": _ID, "src_block_ids": _IDS, "dst_block_ids": _IDS, "tag": int,
             "data_address": dict, "layout": (dict, type(None))},
    "describe": {"transfer_id": _ID},
    "layout": {"transfer_id": _ID, "layout": dict},
    "done": {"transfer_id": _ID, "request_id": _ID, "prefill_instance_id": _ID},
    "failed": {"transfer_id": _ID, "request_id": _ID, "prefill_instance_id": _ID, "reason": _OPT},
    "accepted": {"transfer_id": _ID, "num_runs": int, "data_address": dict},
    "rejected": {"transfer_id": _OPT, "reason": _ID},
    "send_failed": {"transfer_id": _ID, "reason": _ID},
}


class ControlMessageError(ValueError):
    """A control frame failed a check; the message says which."""


def encode(key: bytes | None, msg: dict) -> bytes:
    body = json.dumps({"v": CONTROL_VERSION, **msg}).encode()
    return mac(key or b"", body) + body


def decode(key: bytes | None, frame: bytes) -> dict:
    """The checked message in `frame`; raises ControlMessageError."""
    tag, body = frame[:MAC_BYTES], frame[MAC_BYTES:]
    if len(tag) < MAC_BYTES or not mac_ok(key or b"", body, tag):
        raise ControlMessageError(f"bad or missing MAC ({len(frame)} bytes)")
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ControlMessageError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != CONTROL_VERSION or msg.get("type") not in _FIELDS:
        raise ControlMessageError(f"unknown version or type: {body[:120]!r}")
    for name, kind in _FIELDS[msg["type"]].items():
        if not _is(msg.get(name), kind):
            raise ControlMessageError(f"{msg['type']}: field {name!r} is missing or of the wrong type")
    return msg


def _is(value, kind) -> bool:
    if kind == _IDS:
        return isinstance(value, list) and all(type(b) is int and b >= 0 for b in value)
    if kind is int:
        return type(value) is int and 0 <= value < 2**64
    return isinstance(value, kind) and not isinstance(value, bool)


def _open(zctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = zctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


class ControlServer:
    """Prefill side: a ROUTER that receives load/done/failed and answers the sender."""

    def __init__(self, zctx: zmq.asyncio.Context, host: str, port: int, key: bytes | None):
        self._key = key
        self._sock = _open(zctx, zmq.ROUTER)
        if port == 0:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
        self.address = f"tcp://{host}:{port}"
        self.bound = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dropped = 0

    async def recv(self) -> tuple[bytes, dict | None]:
        """(peer identity, message); message None if it failed a check (logged, counted)."""
        frames = await self._sock.recv_multipart()
        try:
            if len(frames) != 2:
                raise ControlMessageError(f"{len(frames) - 1} frames instead of 1")
            return frames[0], decode(self._key, frames[1])
        except ControlMessageError as exc:
            self.dropped += 1
            logger.warning("dropping a control message: %s", exc)
            return frames[0], None

    def reply(self, peer: bytes, msg: dict) -> None:
        try:  # a ROUTER drops messages for unknown peers; never block the loop on a slow one
            self._sock.send_multipart([peer, encode(self._key, msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("control reply to a peer dropped (queue full): %s", msg.get("type"))

    def close(self) -> None:
        self._sock.close(linger=0)


class ControlClient:
    """Decode side: one DEALER per prefill control address; replies routed by transfer_id."""

    def __init__(self, zctx: zmq.asyncio.Context, key: bytes | None):
        self._zctx, self._key = zctx, key
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._inboxes: dict[str, asyncio.Queue] = {}
        self.dropped = 0

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
            self._dealer(address).send(encode(self._key, msg), flags=zmq.NOBLOCK)
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
            sock = _open(self._zctx, zmq.DEALER)
            sock.connect(address)
            self._dealers[address] = sock
            self._readers[address] = asyncio.ensure_future(self._read(address, sock))
        return self._dealers[address]

    async def _read(self, address: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                if len(frames) != 1:
                    raise ControlMessageError(f"{len(frames)} frames instead of 1")
                msg = decode(self._key, frames[0])
            except ControlMessageError as exc:
                self.dropped += 1
                logger.warning("dropping a control message from %s: %s", address, exc)
                continue
            inbox = self._inboxes.get(msg.get("transfer_id") or "")
            if inbox is not None:
                inbox.put_nowait(msg)
