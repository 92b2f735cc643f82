"""WebSocket proxying for both faces.

- `handshake` (pure): the core's rules for an upgrade, used by both faces.
- `relay_async`: the ASGI face (and the a2wsgi bridge) opens the upstream with
  the `websockets` asyncio client and relays messages, extensions per hop.
- `tunnel`, `splice`, `framing` (pure): the WSGI face takes over the client
  socket after the upstream's 101 and relays raw bytes, as nginx does.

`relay_async` (and with it the `websockets` library) is imported only when a
WebSocket arrives; the WSGI face imports the handshake and the tunnel, which
need no third-party package. uvicorn's WebSocket settings (implementation,
message limit, a log filter) live in `dualproxy.servers.uvicorn`.
"""
