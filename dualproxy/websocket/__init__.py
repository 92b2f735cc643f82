"""WebSocket proxying: the pure handshake plan both faces share, and the async relay.

`handshake` is pure (the core's rules for an upgrade); `relay_async` opens the
upstream socket with the `websockets` asyncio client for the ASGI face (and
the a2wsgi bridge). Nothing here is imported until a WebSocket arrives.
"""
