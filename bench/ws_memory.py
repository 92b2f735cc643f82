"""The memory one ASGI WebSocket can hold (a measurement, not a test).

Both peers send `--ws-max-size` binary messages as fast as TCP takes them and never
read a byte (raw sockets, so no client library reads ahead); the proxy's RSS growth
(its process and children) is what it holds for that one socket.

    python -m bench.ws_memory BYTES [uvicorn|gunicorn] [both|up|down]

Measured (asgi-uvicorn, Python 3.11): 1 MiB -> 10 MB, 4 MiB -> 46 MB, 16 MiB (the
default) -> 190 MB with both directions flooded (asgi-gunicorn: 202 MB); at 16 MiB up
only 65 MB, down only 139 MB. About 12 x the largest message: per direction the
server's or the library's read-ahead, the message in the relay's hands and the
transport's write buffer.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for each in (pid, *map(int, children)):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                total += int(line.split()[1])
    return total // 1024


def frame(payload: bytes, masked: bool) -> bytes:
    """One binary frame (a client's masked with a zero key: the payload stays as is)."""
    head = bytes([0x82, (0x80 if masked else 0) | 127]) + struct.pack("!Q", len(payload))
    return head + (b"\0\0\0\0" if masked else b"") + payload


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1)
    return data


def flood(sock: socket.socket, message: bytes, counts: dict[str, int], key: str) -> None:
    try:
        while True:
            sock.sendall(message)
            counts[key] += 1
    except OSError:
        pass


def serve_upstream(listener: socket.socket, size: int, mode: str,
                   counts: dict[str, int]) -> None:
    conn, _ = listener.accept()
    request = read_head(conn)
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    if mode in ("both", "down"):
        flood(conn, frame(b"x" * size, masked=False), counts, "down")
    else:
        time.sleep(3600)


def main(size: int, server: str, mode: str) -> None:
    counts = {"up": 0, "down": 0}
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=serve_upstream, args=(listener, size, mode, counts),
                     daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualproxy", "serve", "--upstream",
         f"http://127.0.0.1:{listener.getsockname()[1]}", "--bind", f"127.0.0.1:{port}",
         "--adapter", "asgi", "--server", server, "--ws-max-size", str(size),
         "--log-level", "warning"], cwd=ROOT)
    try:
        time.sleep(4)
        base = peak = rss_mb(proc.pid)
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       b"Sec-WebSocket-Version: 13\r\n\r\n")
        print(read_head(client).split(b"\r\n")[0].decode())
        if mode in ("both", "up"):
            threading.Thread(target=flood, args=(client, frame(b"x" * size, masked=True),
                                                 counts, "up"), daemon=True).start()
        for _ in range(30):
            time.sleep(0.5)
            peak = max(peak, rss_mb(proc.pid))
        print(f"{mode} max={size >> 20}MiB {server}: base {base} MB, peak {peak} MB, "
              f"held {peak - base} MB (messages sent: up {counts['up']}, "
              f"down {counts['down']})")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    rest = sys.argv[2:]
    main(int(sys.argv[1]), rest[0] if rest else "uvicorn", rest[1] if len(rest) > 1 else "both")
