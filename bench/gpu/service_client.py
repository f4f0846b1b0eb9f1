"""A minimal client of `embeddinggemma serve`, speaking crates/engine/src/service/protocol.rs:
frames of a u32 little-endian length and a payload of protocol version, tag, body.
Versions 1 and 2 (2 adds `model` and `background` to Embed); the service's is learnt from its
answer to a Ping, which carries its version even when it refuses ours.
Standard library only (the check runs where nothing else is installed)."""

import json
import socket
import struct

KNOWN_VERSIONS = (2, 1)  # newest first
EMBED, STATS, PING = 1, 2, 3
EMBEDDED, ERROR, STATS_REPLY, PONG = 1, 2, 3, 4


class ServiceError(Exception):
    pass


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def _connect(path, timeout):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def negotiate(path, timeout=300.0):
    """The protocol version the service at `path` speaks (one of KNOWN_VERSIONS)."""
    for version in KNOWN_VERSIONS:
        client = Client(path, timeout, version)
        try:
            tag, _ = client._exchange(PING, check_version=False)
            theirs = client.reply_version
        finally:
            client.close()
        if theirs == version and tag == PONG:
            return version
        if theirs in KNOWN_VERSIONS:
            return theirs
    raise ServiceError(f"the service speaks protocol version {theirs}; this client knows {KNOWN_VERSIONS}")


class Client:
    def __init__(self, path, timeout=300.0, version=None):
        self.version = negotiate(path, timeout) if version is None else version
        self.sock = _connect(path, timeout)

    def close(self):
        self.sock.close()

    def _exchange(self, tag, body=b"", check_version=True):
        payload = bytes([self.version, tag]) + body
        self.sock.sendall(struct.pack("<I", len(payload)) + payload)
        (length,) = struct.unpack("<I", self._read(4))
        reply = self._read(length)
        self.reply_version = reply[0]
        if check_version and reply[0] != self.version:
            raise ServiceError(f"reply of protocol version {reply[0]}, expected {self.version}")
        return reply[1], reply[2:]

    def _read(self, n):
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ServiceError("the service closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def embed(self, texts, task="document", dim=768, truncate=True):
        """Unit vectors for `texts`, and the call's stats as the service measured them."""
        body = _str(task) + struct.pack("<IB", dim, int(truncate))
        if self.version >= 2:
            body += _str("") + bytes([0])  # model: any; background: no (interactive)
        body += struct.pack("<I", len(texts)) + b"".join(_str(t) for t in texts)
        tag, rest = self._exchange(EMBED, body)
        if tag == ERROR:
            (length,) = struct.unpack_from("<I", rest, 1)
            raise ServiceError(f"error kind {rest[0]}: {rest[5:5 + length].decode('utf-8', 'replace')}")
        if tag != EMBEDDED:
            raise ServiceError(f"unexpected reply tag {tag}")
        d, count = struct.unpack_from("<II", rest, 0)
        values = struct.unpack_from(f"<{d * count}f", rest, 8)
        stats = struct.unpack_from("<6Q", rest, 8 + 4 * d * count)
        keys = ("texts", "tokens", "truncated", "forward_passes", "queue_wait_us", "forward_us")
        return [list(values[i * d:(i + 1) * d]) for i in range(count)], dict(zip(keys, stats))

    def stats(self):
        tag, rest = self._exchange(STATS)
        if tag != STATS_REPLY:
            raise ServiceError(f"unexpected reply tag {tag}")
        (length,) = struct.unpack_from("<I", rest, 0)
        return json.loads(rest[4:4 + length].decode("utf-8"))

    def ping(self):
        tag, rest = self._exchange(PING)
        if tag != PONG:
            raise ServiceError(f"unexpected reply tag {tag}")
        (length,) = struct.unpack_from("<I", rest, 0)
        return rest[4:4 + length].decode("utf-8")
