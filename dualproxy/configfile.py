"""`dualproxy serve --config FILE.toml`: server options at the top, one `[[route]]` table a route.

Keys are the `serve` flags' names in snake_case (`idle_timeout`, `max_body_size`),
as TOML users write them; `trusted_proxies` is the list `--trusted-proxy` repeats
and `access_log = false` is `--no-access-log`. Each value is checked by its TOML
type, then by the very validator and choices its flag has (cli.py), then each
route as a whole by ProxyConfig, all before any server starts. An error names the
key, the route (#n and its mount) and the file line: tomllib gives no positions,
so the line is found by scanning the text for the key inside the nth `[[route]]`.
The command line's server flags win over the file's; route flags are refused.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The top-level keys: one line each, the rest of the flags are route options.
SERVER_KEYS = (
    "bind", "adapter", "server", "workers", "threads", "ws_max_tunnels", "header_timeout",
    "graceful_timeout", "log_level",
    "access_log", "access_log_format", "certfile", "keyfile", "metrics_bind",
)
# Where a key's flag is not `--` + the key with dashes.
_FLAG_DEST = {"trusted_proxies": "trusted_proxy", "access_log": "no_access_log",
              "forwarded_prefix": "no_forwarded_prefix", "sub_filter_types": "sub_filter_type"}
# `access_log = false` sets --no-access-log, `forwarded_prefix = false` --no-forwarded-prefix
_INVERTED = {"access_log", "forwarded_prefix"}
# Repeatable `FROM=TO` flags a route may also write as a table, `{"FROM" = "TO"}`
# (or a `[route.KEY]` sub-table): the table form takes a FROM holding `=`.
_PAIR_TABLES = {"sub_filter"}
_NOT_KEYS = {"help", "config"}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a table"}
_HEADER = re.compile(r"\s*\[")
_ROUTE_HEADER = re.compile(r"\s*\[\[\s*route\s*\]\]")
_DECODE_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")

Options = dict[str, Any]


class ConfigError(Exception):
    """A bad config file: the message starts with `FILE:LINE:`."""


class FlagConflict(ConfigError):
    """Route flags on the command line next to `--config` (a usage error)."""


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` subcommand's parser inside the `dualproxy` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices["serve"]
            return sub
    raise LookupError("no serve subcommand")


def _dest(key: str) -> str:
    return _FLAG_DEST.get(key, key)


def _key(dest: str) -> str:
    return next((k for k, d in _FLAG_DEST.items() if d == dest), dest)


class _Text:
    """The file's lines, to find where a key is written (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.routes = [n for n, line in enumerate(self.lines, 1) if _ROUTE_HEADER.match(line)]

    def route_line(self, route: int) -> int | None:
        return self.routes[route - 1] if route <= len(self.routes) else None

    def key_line(self, key: str, route: int | None) -> int | None:
        """The line of `key = ...` at the top (route None) or in the nth [[route]]."""
        start = 0 if route is None else self.route_line(route)
        if start is None:
            return None
        pattern = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
                             r"\s*=")
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if _HEADER.match(line):
                return None
            if pattern.match(line):
                return number
        return None


class _Loader:
    """The known keys (from the `serve` flags) and the checks of one file's values."""

    def __init__(self, path: str, text: str, serve: argparse.ArgumentParser,
                 toml_types: Mapping[Any, tuple[type, ...]]) -> None:
        self.path = path
        self.text = _Text(text)
        self.toml_types = toml_types
        self.actions = {a.dest: a for a in serve._actions if a.dest not in _NOT_KEYS}
        self.server_keys = [k for k in SERVER_KEYS if _dest(k) in self.actions]
        self.route_keys = [_key(d) for d in self.actions if _key(d) not in SERVER_KEYS]

    def error(self, message: str, line: int | None) -> ConfigError:
        return ConfigError(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")

    def unknown(self, key: str, where: str, route: int | None) -> ConfigError:
        own = self.route_keys if route else [*self.server_keys, "route"]
        other = self.server_keys if route else self.route_keys
        # A route key at the top, a server key in a route: say where it belongs.
        place = (" (a server option: put it at the top, before the first [[route]])" if route
                 else " (a route option: put it inside a [[route]] table)")
        if key in other:
            hint = place
        else:  # a misspelling, of a key of this table or of the other
            close = difflib.get_close_matches(key.replace("-", "_"), [*own, *other], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            if close and close[0] in other:
                hint += place
            if "-" in key:
                hint += " (keys are snake_case)"
        return self.error(f"unknown key '{key}' {where}{hint}",
                          self.text.key_line(key, route))

    def value(self, key: str, value: Any, where: str, route: int | None) -> Any:
        """The flag's value for a key's TOML value, checked as the command line checks it."""
        action = self.actions[_dest(key)]
        line = self.text.key_line(key, route)
        append = isinstance(action, argparse._AppendAction)
        if action.nargs == 0:  # a store_true flag
            self._expect(key, value, (bool,), where, line)
            return action.const if value != (key in _INVERTED) else action.default
        if not append and key != "upstream":
            return self._convert(key, action, value, where, line)
        if key in _PAIR_TABLES and isinstance(value, dict):
            for src, dst in value.items():
                self._expect(key, dst, (str,), where, line)
                if not src:
                    raise self.error(f"bad value for '{key}' {where}: an empty pattern", line)
            return list(value.items())
        items = [value] if isinstance(value, str) else value  # a repeatable flag: a list
        self._expect(key, items, (list,), where, line)
        if key != "upstream":
            return [self._convert(key, action, item, where, line) for item in items]
        # One URL, or several: one pool (ProxyConfig checks them), whatever --upstream takes.
        if not items:
            raise self.error(f"'upstream' {where} is an empty list", line)
        return items if append or len(items) > 1 else items[0]

    def _convert(self, key: str, action: argparse.Action, value: Any, where: str,
                 line: int | None) -> Any:
        kinds = self.toml_types.get(action.type, (str,) if action.type in (None, str)
                                    else (str, int, float))
        self._expect(key, value, kinds, where, line)
        try:
            result = action.type(str(value)) if callable(action.type) else str(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise self.error(f"bad value for '{key}' {where}: {exc}", line) from None
        if action.choices is not None and result not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            raise self.error(f"bad value for '{key}' {where}: {value!r} is not one of "
                             f"{choices}", line)
        return result

    def _expect(self, key: str, value: Any, kinds: tuple[type, ...], where: str,
                line: int | None) -> None:
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            wanted = ("a number" if float in kinds and int in kinds and len(kinds) == 2
                      else " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds))
            got = _TYPE_NAMES.get(type(value), type(value).__name__)
            raise self.error(f"'{key}' {where} must be {wanted}, got {got} ({value!r})", line)
        if isinstance(value, list):
            for item in value:
                self._expect(key, item, (str,), where, line)


def _parse_toml(path: str, text: str) -> dict[str, Any]:
    """The TOML document; a syntax error as `FILE:LINE: TOML syntax: ...`."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
        return data
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
    match = _DECODE_AT.search(message)
    if match:
        line, message = match[1], f"{message[:match.start()]} (column {match[2]})"
    else:
        line = str(len(text.splitlines()) or 1)
        message = message.replace("(at end of document)", "(at the end of the file)")
    raise ConfigError(f"{path}:{line}: TOML syntax: {message}")


def load(
    path: str,
    argv: Sequence[str],
    build_parser: Callable[[], argparse.ArgumentParser],
    to_options: Callable[[argparse.Namespace], Options],
    check_route: Callable[[Options], Any],
    toml_types: Mapping[Any, tuple[type, ...]],
) -> tuple[argparse.Namespace, list[Options]]:
    """The `serve` arguments (the file's server options under the command line's) and
    one JSON-able options dict per route, every route checked by `check_route`
    (ProxyConfig's checks; it returns the config). ConfigError when anything is bad."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    data = _parse_toml(path, text)
    loader = _Loader(path, text, serve_parser(build_parser()), toml_types)
    _refuse_route_flags(argv, build_parser, loader)

    file_argv: list[str] = []
    for key, value in data.items():
        if key == "route":
            continue
        if key not in loader.server_keys:
            raise loader.unknown(key, "at the top of the file", None)
        action = loader.actions[_dest(key)]
        converted = loader.value(key, value, "at the top of the file", None)
        flag = action.option_strings[0]
        if action.nargs == 0:
            file_argv += [flag] if converted != action.default else []
        else:
            file_argv += [flag, str(value)]
    at = argv.index("serve") + 1
    args = build_parser().parse_args([*argv[:at], *file_argv, *argv[at:]])

    tables = data.get("route")
    if not isinstance(tables, list) or not tables:
        hint = " ([route] must be [[route]])" if isinstance(tables, dict) else ""
        raise loader.error(f"no [[route]] table: a config file needs at least one route{hint}",
                           loader.text.key_line("route", None))
    routes: list[Options] = []
    mounts: dict[str, int] = {}
    for number, table in enumerate(tables, 1):
        route, mount = _route(loader, args, number, table, to_options, check_route)
        if mount in mounts:
            raise loader.error(
                f"mount '{mount or '/'}' of [[route]] #{number} is already the mount of "
                f"[[route]] #{mounts[mount]}",
                loader.text.key_line("mount", number) or loader.text.route_line(number))
        mounts[mount] = number
        routes.append(route)
    # The first route's upstream stands for --upstream (unused: the routes list wins).
    args.upstream = loader.value("upstream", tables[0]["upstream"], "", 1)
    return args, routes


def _route(loader: _Loader, args: argparse.Namespace, number: int, table: Any,
           to_options: Callable[[argparse.Namespace], Options],
           check_route: Callable[[Options], Any]) -> tuple[Options, str]:
    """One [[route]] table's options, checked, and its normalized mount."""
    header = loader.text.route_line(number)
    if not isinstance(table, dict):
        raise loader.error(f"route #{number} must be a table ([[route]])", header)
    mount = table.get("mount", "/")
    name = f"[[route]] #{number} (mount {mount!r})"
    where = f"in {name}"
    for key in table:
        if key not in loader.route_keys:
            raise loader.unknown(key, where, number)
    if "upstream" not in table:
        raise loader.error(f"{name} has no 'upstream'", header)
    route_args = argparse.Namespace(**vars(args))
    for key, value in table.items():
        setattr(route_args, _dest(key), loader.value(key, value, where, number))
    options = to_options(route_args)
    route = {k: v for k, v in options.items() if k not in SERVER_KEYS}
    try:
        config = check_route(route)
    except ValueError as exc:
        named = [k for k, v in table.items() if _blames(k, v, str(exc))]
        line = loader.text.key_line(named[0], number) if named else None
        raise loader.error(f"{name}: {exc}", line or header) from None
    return route, str(config.mount)


def _blames(key: str, value: Any, message: str) -> bool:
    """Does ProxyConfig's message name this key (or its flag), or quote one of its values?"""
    values = value if isinstance(value, list) else [value]
    names = "|".join(re.escape(name) for name in (key, key.replace("_", "-")))
    return (re.search(rf"(?<!\w)(?:{names})(?![\w-])", message) is not None
            or any(isinstance(v, str) and repr(v) in message for v in values))


def _refuse_route_flags(argv: Sequence[str], build_parser: Callable[[], argparse.ArgumentParser],
                        loader: _Loader) -> None:
    """A usage error for route flags next to --config: the file holds every route."""
    probe = build_parser()
    serve = serve_parser(probe)
    for action in serve._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    given = vars(probe.parse_args(argv))
    flags = [loader.actions[_dest(k)].option_strings[0] for k in loader.route_keys
             if _dest(k) in given]
    if flags:
        raise FlagConflict(f"{', '.join(flags)} cannot be given with --config: "
                           "the routes and their options come from the file")
