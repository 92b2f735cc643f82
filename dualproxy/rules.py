"""Header rules: their grammar, their checks and how they change a header list.

Pure, at the bottom of the package (the configuration checks a route's rules
when it is built; the `header_rules` filter, filters/header_rules.py, runs them
per exchange). A rule is written as on the command line:

- `Name: value` sets the field: every line of it is replaced by this one;
- `+Name: value` adds a line (after those already there);
- `-Name` removes every line of it.

Values may hold variables, `{client}`, `{request_id}`, `{host}`, `{scheme}`
(their values: filters/header_rules.py); `{{` and `}}` are literal braces. A
value that comes out empty removes the field (nginx's rule: an empty
`proxy_set_header` is not sent).

Checked once, when the configuration is built (ValueError naming the rule): the
syntax, the variables, and the names. Framing and hop-by-hop fields are the
proxy's and the servers' (Content-Length, Transfer-Encoding, Connection, TE,
Upgrade, ...), never a rule's; Host may only be set upstream (nginx's
`proxy_set_header Host`), to a valid authority. Per request, a value made of
variables is checked by the wire rules: one that would carry CR, LF or NUL (or a
Host that is not an authority) is a BadRequest (400), never sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import BadRequest
from .wire import BAD_FIELD_VALUE, FIELD_NAME, HOP_BY_HOP, valid_authority

Header = tuple[bytes, bytes]

#: The variables a value may name, and what each one is.
VARIABLES = {
    "client": "the client's address, after trusted proxies",
    "request_id": "the exchange's request id (needs request ids on)",
    "host": "the Host the client asked for, port included",
    "scheme": "the scheme the client came with: http or https",
}
OPERATIONS = ("set", "add", "remove")
# Never a rule's: the framing (the chain and the servers write it) and every
# hop-by-hop field (they describe one connection, RFC 9110 7.6.1).
_FORBIDDEN = HOP_BY_HOP | {b"content-length", b"expect"}
# Each server writes its own Date and Server: a rule would send them twice.
_FORBIDDEN_DOWN = _FORBIDDEN | {b"date", b"server", b"host"}
_PIECE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]|[^{}]+")


@dataclass(frozen=True)
class HeaderRule:
    """One rule: `op` (set, add or remove) on field `name` (lower-case bytes).
    `parts` is the value: literal bytes and variable names (str), in order."""

    op: str
    name: bytes
    parts: tuple[bytes | str, ...] = ()
    #: the value when it names no variable (None otherwise), made once
    static: bytes | None = field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not any(isinstance(part, str) for part in self.parts):
            object.__setattr__(self, "static", b"".join(
                part for part in self.parts if isinstance(part, bytes)))

    @property
    def variables(self) -> set[str]:
        return {part for part in self.parts if isinstance(part, str)}

    def __str__(self) -> str:
        name = self.name.decode("latin-1")
        if self.op == "remove":
            return f"-{name}"
        value = "".join("{" + p + "}" if isinstance(p, str)
                        else p.decode("latin-1").replace("{", "{{").replace("}", "}}")
                        for p in self.parts)
        return f"{'+' if self.op == 'add' else ''}{name}: {value}"


def parse_rule(text: str | HeaderRule, direction: str) -> HeaderRule:
    """The rule `text` writes (`Name: value`, `+Name: value`, `-Name`) for
    `direction` ("up" or "down"); ValueError saying what is wrong."""
    if isinstance(text, HeaderRule):
        rule = text
    else:
        if not isinstance(text, str):
            raise ValueError(f"header_{direction}: a rule is a string like 'Name: value', "
                             f"'+Name: value' or '-Name', got {type(text).__name__}")
        rule = _parse_text(text, direction)
    _check_rule(rule, direction, str(text))
    return rule


def _parse_text(text: str, direction: str) -> HeaderRule:
    where = f"header_{direction} rule {text!r}"
    written = text.strip()
    op = "set"
    if written[:1] == "-":
        op, written = "remove", written[1:]
        if ":" in written:
            raise ValueError(f"{where}: a removal ('-Name') takes no value")
        return HeaderRule(op, _name(written, where))
    if written[:1] == "+":
        op, written = "add", written[1:]
    name, colon, value = written.partition(":")
    if not colon:
        raise ValueError(f"{where}: write 'Name: value' (set), '+Name: value' (add) or "
                         "'-Name' (remove)")
    return HeaderRule(op, _name(name, where), _template(value.strip(), where))


def _name(text: str, where: str) -> bytes:
    name = text.strip().lower().encode("latin-1", "replace")
    if not FIELD_NAME.match(name):
        raise ValueError(f"{where}: {text.strip()!r} is not a header name (a token)")
    return name


def _template(value: str, where: str) -> tuple[bytes | str, ...]:
    parts: list[bytes | str] = []
    for match in _PIECE.finditer(value):
        piece = match[0]
        if match[1] is not None:
            variable = match[1].strip()
            if variable not in VARIABLES:
                known = ", ".join("{" + v + "}" for v in VARIABLES)
                raise ValueError(f"{where}: unknown variable {piece} (known: {known}; "
                                 "write {{ and }} for literal braces)")
            parts.append(variable)
            continue
        if piece in ("{", "}"):
            raise ValueError(f"{where}: a lone {piece!r}: variables are written {{name}}, "
                             "literal braces {{ and }}")
        literal = piece[0] if piece in ("{{", "}}") else piece
        try:
            data = literal.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: the value is not latin-1 text") from None
        if parts and isinstance(parts[-1], bytes):
            parts[-1] += data
        else:
            parts.append(data)
    return tuple(parts)


def _check_rule(rule: HeaderRule, direction: str, text: str) -> None:
    where = f"header_{direction} rule {text!r}"
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    if rule.op not in OPERATIONS:
        raise ValueError(f"{where}: the operation must be one of {', '.join(OPERATIONS)}")
    if not isinstance(rule.name, bytes) or not FIELD_NAME.match(rule.name):
        raise ValueError(f"{where}: {rule.name!r} is not a header name (a token)")
    refused = refused_name(rule.name, direction, rule.op)
    if refused is not None:
        raise ValueError(f"{where}: {refused}")
    static = rule.static
    if static is not None and BAD_FIELD_VALUE.search(static):
        raise ValueError(f"{where}: a value carries no CR, LF or NUL")
    if rule.name == b"host" and static is not None and not valid_authority(static):
        raise ValueError(f"{where}: {static.decode('latin-1')!r} is not a valid Host "
                         "(host[:port])")


def refused_name(name: bytes, direction: str, op: str) -> str | None:
    """Why no rule (nor `add_*_headers` option) may `op` the field `name` in
    `direction` ("up" or "down"), or None: it may."""
    forbidden = _FORBIDDEN_DOWN if direction == "down" else _FORBIDDEN
    if name in forbidden:
        why = ("each server writes its own" if name in (b"date", b"server")
               else "Host is a request header" if name == b"host"
               else "framing and hop-by-hop fields are the proxy's")
        return f"{name.decode()} cannot be changed by a rule ({why})"
    if name == b"host" and op != "set":
        return "Host can only be set ('Host: value'): a request has exactly one"
    return None


def apply(headers: list[Header], rules: tuple[HeaderRule, ...],
          values: dict[str, bytes] | None) -> list[Header]:
    """`headers` after `rules`, in order; `values`: the variables' values for
    rules that name some (None: the route's rules name none)."""
    for rule in rules:
        name = rule.name
        if rule.op == "remove":
            headers = [(n, v) for n, v in headers if n.lower() != name]
            continue
        value = rule.static
        if value is None:
            assert values is not None
            value = b"".join(p if isinstance(p, bytes) else values[p] for p in rule.parts)
            if BAD_FIELD_VALUE.search(value):
                raise BadRequest(f"a header rule's value for {name.decode()} would carry "
                                 "CR, LF or NUL")
            if name == b"host" and not valid_authority(value):
                raise BadRequest("a header rule's Host is not a valid authority")
        if rule.op == "add":
            if value:
                headers.append((name, value))
            continue
        out: list[Header] = []
        placed = not value  # an empty value removes the field
        for n, v in headers:
            if n.lower() == name:
                if not placed:
                    out.append((name, value))
                    placed = True
                continue
            out.append((n, v))
        if not placed:
            out.append((name, value))
        headers = out
    return headers
