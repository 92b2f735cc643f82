"""Cache keys: what identifies a stored response (RFC 9111 2 and 4.1).

The primary key is the URI the client asked for: its public scheme, its Host and
its raw target (never the upstream the proxy chose, nor the target it rewrote).
The secondary key is the request's values of the fields the response's `Vary`
names, normalised (lines combined, spaces around commas removed).
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

from ...core import IncomingRequest
from ...headers import Header
from .policy import first, split_list, values

VaryNames = tuple[bytes, ...]
VaryValues = tuple["bytes | None", ...]


def primary_key(incoming: IncomingRequest) -> str:
    """`scheme://host/target` as the client addressed it."""
    return key_for(incoming, first(incoming.headers, b"host"))


def key_for(incoming: IncomingRequest, host: bytes | None) -> str:
    """`primary_key` with the request's (first) Host value found already."""
    target = incoming.target.decode("latin-1")
    if target[:1] != "/" and ("://" in target.split("/", 1)[0]
                              or target.startswith(("http://", "https://"))):
        return target  # absolute-form: the client named the URI itself
    if host is None:
        return f"{incoming.scheme}://{target}"
    return f"{incoming.scheme}://{host.decode('latin-1').strip().lower()}{target}"


def vary_names(headers: Sequence[Header]) -> VaryNames | None:
    """The lower-case field names a response varies on; None for `Vary: *` (it
    never matches a later request, RFC 9111 4.1)."""
    names: list[bytes] = []
    for line in values(headers, b"vary"):
        for item in split_list(line):
            name = item.lower()
            if name == b"*":
                return None
            if name not in names:
                names.append(name)
    return tuple(sorted(names))


def vary_values(request: Sequence[Header], names: VaryNames) -> VaryValues:
    """The request's normalised values of `names` (None: the field is absent)."""
    out: list[bytes | None] = []
    for name in names:
        lines = values(request, name)
        if not lines:
            out.append(None)
            continue
        out.append(b",".join(item for line in lines for item in split_list(line)))
    return tuple(out)


def same_origin_key(key: str, reference: bytes) -> str | None:
    """The key of a URI a response names (Location, Content-Location), resolved
    against the request's; None when it is on another origin (RFC 9111 4.4:
    never invalidated from here)."""
    try:
        resolved = urljoin(key, reference.decode("latin-1").strip())
        base, other = urlsplit(key), urlsplit(resolved)
    except ValueError:
        return None
    if (base.scheme, base.netloc.lower()) != (other.scheme, other.netloc.lower()):
        return None
    path = other.path or "/"
    query = f"?{other.query}" if other.query else ""
    return f"{other.scheme}://{other.netloc.lower()}{path}{query}"
