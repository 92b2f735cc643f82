"""TLS to https upstreams: the one client SSLContext, made from httpx's `verify` and `cert`.

Both HTTP/1.1 drivers and both WebSocket paths take their context from
`client_context`, so a route's TLS settings mean the same on every path, and
the context (loading a CA store costs milliseconds) is made once per process
for one setting. The server name (SNI and the name checked in the certificate)
is the upstream URL's host, given by the caller at each connection.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from ..config import ProxyConfig
    from ..upstreams import Upstream

Verify: TypeAlias = "bool | str | ssl.SSLContext"
Cert: TypeAlias = "str | tuple[str, str] | None"


class TLSConfigError(ValueError):
    """A CA bundle or client certificate that cannot be loaded (the message names the file)."""


def client_context(verify: Verify = True, cert: Cert = None) -> ssl.SSLContext:
    """The SSLContext for connecting to upstreams, as httpx reads `verify` and `cert`.

    `verify`: True, the system CAs; a path, that CA bundle (a PEM file, or a
    directory of hashed certificates) instead; False, no verification at all
    (no certificate or name check); an SSLContext, used as given (`cert` is then
    ignored: load it into your context). `cert`: a PEM file holding the client
    certificate and its key, or (certfile, keyfile), for mutual TLS. Offers
    ALPN http/1.1 only: dualproxy speaks HTTP/1.1 upstream.
    """
    if isinstance(verify, ssl.SSLContext):
        return verify
    return _context(verify, tuple(cert) if isinstance(cert, list) else cert)


def upstream_context(config: ProxyConfig, upstream: Upstream | None = None
                     ) -> ssl.SSLContext | None:
    """The context for `upstream` (None unless https), or for the config's https
    upstreams when no upstream is named (None when it has none)."""
    tls = upstream.tls if upstream is not None else any(u.tls for u in config.upstreams)
    return client_context(config.verify, config.cert) if tls else None


@functools.lru_cache(maxsize=16)
def _context(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl.SSLContext:
    if verify is True or verify is False:
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    else:
        path = os.fspath(verify)
        try:
            if os.path.isdir(path):
                context = ssl.create_default_context(capath=path)
            else:
                context = ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load the CA bundle {path}: {_reason(exc)}") from None
    if cert is not None:
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            files = certfile if keyfile is None else f"{certfile} / {keyfile}"
            raise TLSConfigError(
                f"cannot load the client certificate {files}: {_reason(exc)}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


def verification_failure(exc: BaseException) -> str | None:
    """Why the upstream's certificate was refused, when `exc` is that refusal; else None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason or "certificate verify failed")
    return None
