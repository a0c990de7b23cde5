"""A small blocking client of one node (HTTP + WebSocket), standard library only.

The CLI runs on CI hosts next to arbitrary build tools, so it stays synchronous and
dependency-light: Ctrl-C is a plain KeyboardInterrupt, and no reactor has to be stopped.
Never used inside the agent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class NodeError(Exception):
    """An HTTP error reply; ``status`` 0 means the node could not be reached."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class HandshakeError(Exception):
    """The WebSocket upgrade was refused (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"WebSocket handshake refused: {status} {message}")
        self.status = status


class ConnectionClosed(Exception):
    """The WebSocket ended; ``code`` and ``reason`` come from the close frame, if any."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"WebSocket closed ({code}): {reason}")
        self.code = code
        self.reason = reason


def decode_output(message: dict[str, Any]) -> bytes:
    """The bytes of an ``output`` message (``encoding`` is ``utf-8`` or ``base64``)."""
    if message.get("encoding") == "base64":
        return base64.b64decode(message["data"])
    return str(message["data"]).encode("utf-8")


class Node:
    """HTTP calls to one node: ``request`` returns the decoded JSON or raises NodeError."""

    def __init__(self, url: str, secret: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {"X-Cluster-Secret": self.secret} if self.secret else {}

    def raw(self, method: str, path: str, body: Any = None,
            timeout: float | None = None) -> tuple[bytes, dict[str, str]]:
        headers = self._headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as reply:
                return reply.read(), dict(reply.headers)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                detail = json.loads(raw)["error"]
                code, message = str(detail["code"]), str(detail["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", raw[:200].decode("utf-8", "replace")
            raise NodeError(error.code, code, message, dict(error.headers)) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise NodeError(0, "unreachable", f"cannot reach {self.url}: {reason}") from None

    def request(self, method: str, path: str, body: Any = None,
                timeout: float | None = None) -> Any:
        data, _ = self.raw(method, path, body, timeout)
        return json.loads(data)

    def websocket(self, timeout: float = 60.0) -> WebSocket:
        parts = urllib.parse.urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))
        return WebSocket.connect(url, headers=self._headers(), timeout=timeout)


class WebSocket:
    """A minimal RFC 6455 client: text/JSON messages, answers pings, reads close frames."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self._sock = sock
        self._buffer = bytearray(leftover)
        self.closed = False

    @classmethod
    def connect(cls, url: str, headers: dict[str, str] | None = None,
                protocols: list[str] | None = None, timeout: float = 60.0) -> WebSocket:
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} "
                     "HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket",
                     "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                     "Sec-WebSocket-Version: 13"]
            if protocols:
                lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            reply = b""
            while b"\r\n\r\n" not in reply:
                more = sock.recv(4096)
                if not more:
                    raise HandshakeError(0, "connection closed during the handshake")
                reply += more
                if len(reply) > 65536:
                    raise HandshakeError(0, "oversized handshake reply")
            head, _, rest = reply.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            if status != 101:
                raise HandshakeError(status, status_line.split(" ", 2)[-1])
            reply_headers = {k.strip().lower(): v.strip() for k, _, v in
                             (line.partition(":") for line in header_lines)}
            accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            if reply_headers.get("sec-websocket-accept") != accept:
                raise HandshakeError(status, "bad Sec-WebSocket-Accept")
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest)

    # -- sending ----------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self._sock.sendall(header + mask + masked)

    def send_json(self, message: Any) -> None:
        self.send_frame(0x1, json.dumps(message).encode())

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(0x1, text.encode() if isinstance(text, str) else text)

    def close(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.send_frame(0x8, struct.pack("!H", code))
            except OSError:
                pass
        self._sock.close()

    # -- receiving --------------------------------------------------------------

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            more = self._sock.recv(max(262144, count - len(self._buffer)))
            if not more:
                self.closed = True
                raise ConnectionClosed(None, "connection lost")
            self._buffer += more
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def receive(self) -> tuple[int, bytes]:
        """The next data message as ``(opcode, payload)``; raises ConnectionClosed."""
        message = bytearray()
        message_opcode = 0
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            if second & 0x80:
                raise ConnectionClosed(1002, "server frames must not be masked")
            payload = self._read(length)
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                if not self.closed:
                    self.closed = True
                    try:
                        self.send_frame(0x8, payload[:2])
                    except OSError:
                        pass
                self._sock.close()
                raise ConnectionClosed(code, reason)
            if opcode == 0x9:
                self.send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode != 0x0:
                message_opcode = opcode
            message += payload
            if first & 0x80:
                return message_opcode, bytes(message)

    def receive_json(self) -> Any:
        _, payload = self.receive()
        return json.loads(payload)

    def messages(self) -> Iterator[Any]:
        while True:
            yield self.receive_json()
