"""The loader: routes.yaml text in, an immutable RoutingTable or located errors out.

Every mistake a file can hold is found here, at load time, with its line and column;
nothing at request time can discover a configuration error.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import jinja2
import jsonschema
import yaml
from jsonschema.exceptions import best_match

from fksroute import schemas
from fksroute.plugins import PLUGIN_TYPES
from fksroute.routing import Limits, MatcherError, PluginSpec, Route, RoutingTable, Schedule, compile_block
from fksroute.transform import OrderTemplate, OrderTemplateError, compile_order, compile_template

DEFAULT_PORT = 4700
DEFAULT_MAX_BODY = 65536
# TradingView's published webhook source addresses (the `tradingview` preset of allow_ips).
TRADINGVIEW_IPS = ("52.89.214.238/32", "34.212.75.30/32", "54.218.53.128/32", "52.32.178.7/32")
_SECRET_REF = re.compile(r"\$\{(env|file|cred):([^}]*)\}")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, order=True)
class ConfigError:
    """One mistake in the file, located."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column, "message": self.message}


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class ServerSettings:
    """Read at start only: a change needs a restart."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    journal: Path = Path("journal.sqlite")
    tls: TlsSettings | None = None


@dataclass(frozen=True)
class SecuritySettings:
    secret: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    path_token: str | None = field(default=None, repr=False)
    allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    rate_per_minute: float | None = None
    rate_burst: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY


def parse_duration(value: Any) -> timedelta:
    """`60s`, `1.5m`, `250ms`, `2h`, `1d`, or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    found = _DURATION.match(str(value))
    if not found:
        raise ValueError(f"invalid duration {value!r}: use e.g. 60s, 5m, 2h")
    return timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])


# --- YAML with positions ---------------------------------------------------------------

Path_ = tuple  # a path into the document: keys and list indexes


class _Located:
    """The document as plain data plus where each value (and each key) starts."""

    def __init__(self) -> None:
        self.values: dict[Path_, tuple[int, int]] = {}
        self.keys: dict[Path_, tuple[int, int]] = {}

    def at(self, path: Iterable[Any], key: bool = False) -> tuple[int, int]:
        path = tuple(path)
        while path:
            table = self.keys if key else self.values
            if path in table:
                return table[path]
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), (1, 1))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _to_data(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, located: _Located,
             errors: list[tuple[tuple[int, int], str]]) -> Any:
    located.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                errors.append((_mark(key_node), "a key must be a plain value"))
                continue
            key = str(key) if not isinstance(key, str) else key
            if key in out:
                errors.append((_mark(key_node), f"duplicate key {key!r}"))
                continue
            located.keys[(*path, key)] = _mark(key_node)
            out[key] = _to_data(loader, value_node, (*path, key), located, errors)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(loader, item, (*path, i), located, errors) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _parse_yaml(text: str) -> tuple[Any, _Located, list[tuple[tuple[int, int], str]]]:
    located = _Located()
    errors: list[tuple[tuple[int, int], str]] = []
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, located, errors
        return _to_data(loader, node, (), located, errors), located, errors
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        errors.append((where, f"YAML syntax: {exc.problem or exc.context}"))
        return None, located, errors
    except yaml.YAMLError as exc:
        errors.append(((1, 1), f"YAML: {exc}"))
        return None, located, errors
    finally:
        loader.dispose()


# --- secrets ------------------------------------------------------------------------------

@dataclass
class _Secrets:
    env: Mapping[str, str]
    base_dir: Path
    values: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)

    def resolve(self, kind: str, name: str) -> str:
        """The secret's text; raises ValueError naming the variable (never the value)."""
        name = name.strip()
        if not name:
            raise ValueError(f"${{{kind}:}} needs a name")
        if kind == "env":
            if name not in self.env:
                raise ValueError(f"environment variable {name} is not set")
            value = self.env[name]
        else:
            if kind == "cred":
                directory = self.env.get("CREDENTIALS_DIRECTORY")
                if not directory:
                    raise ValueError(f"credential {name}: $CREDENTIALS_DIRECTORY is not set "
                                     "(run under systemd with LoadCredential=)")
                path = Path(directory) / name
            else:
                path = self.base_dir / name
            try:
                value = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError:
                raise ValueError(f"{'credential' if kind == 'cred' else 'secret file'} {name} cannot be read") from None
            self.files.append(path)
        if not value:
            raise ValueError(f"secret {kind}:{name} is empty")
        self.values.add(value)
        return value

    def substitute(self, data: Any, path: Path_, located: _Located, errors: list) -> Any:
        if isinstance(data, dict):
            return {k: self.substitute(v, (*path, k), located, errors) for k, v in data.items()}
        if isinstance(data, list):
            return [self.substitute(v, (*path, i), located, errors) for i, v in enumerate(data)]
        if isinstance(data, str) and "${" in data:
            def replace(found: re.Match[str]) -> str:
                try:
                    return self.resolve(found.group(1), found.group(2))
                except ValueError as exc:
                    errors.append((located.at(path), str(exc)))
                    return found.group(0)
            return _SECRET_REF.sub(replace, data)
        return data


# --- the loader ---------------------------------------------------------------------------

class _Builder:
    """Collects located errors while turning the checked document into a RoutingTable."""

    def __init__(self, file: str, base_dir: Path, located: _Located) -> None:
        self.file = file
        self.base_dir = base_dir
        self.located = located
        self.errors: list[ConfigError] = []
        self.files: list[Path] = []

    def error(self, path: Iterable[Any], message: str, key: bool = False) -> None:
        line, column = self.located.at(path, key)
        self.errors.append(ConfigError(self.file, line, column, message))

    def error_at(self, where: tuple[int, int], message: str) -> None:
        self.errors.append(ConfigError(self.file, where[0], where[1], message))

    def check_schema(self, data: Any) -> None:
        validator = schemas.builtin_validator("routes.schema.json")
        for error in validator.iter_errors(data):
            self._report_schema_error(error)

    def _report_schema_error(self, error: jsonschema.ValidationError) -> None:
        if error.context:
            # Of a oneOf's branches, report the one whose type fits, not "is not of type ...".
            fitting = [e for e in error.context if e.validator != "type"]
            error = best_match(fitting or error.context)
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = set(error.schema.get("properties", {}))
            for key in error.instance:
                if key not in allowed:
                    hint = f"; expected one of: {', '.join(sorted(allowed))}" if allowed else ""
                    self.error((*path, key), f"unknown key {key!r}{hint}", key=True)
            return
        where = ".".join(str(p) for p in path) or "file"
        self.error(path, f"{where}: {error.message}")

    def duration(self, settings: Mapping[str, Any], key: str, path: Path_) -> timedelta | None:
        if key not in settings:
            return None
        try:
            return parse_duration(settings[key])
        except ValueError as exc:
            self.error((*path, key), str(exc))
            return None

    def networks(self, items: Any, path: Path_) -> tuple:
        nets = []
        for i, item in enumerate(items or ()):
            names = TRADINGVIEW_IPS if item == "tradingview" else (item,)
            for name in names:
                try:
                    nets.append(ipaddress.ip_network(str(name), strict=False))
                except ValueError:
                    self.error((*path, i), f"{item!r} is not an address, a CIDR or 'tradingview'")
        return tuple(nets)

    def path(self, value: str) -> Path:
        return (self.base_dir / value) if not Path(value).is_absolute() else Path(value)

    def server(self, raw: Mapping[str, Any]) -> ServerSettings:
        tls = None
        if isinstance(raw.get("tls"), Mapping):
            t = raw["tls"]
            tls = TlsSettings(self.path(t["cert"]), self.path(t["key"]),
                              self.path(t["client_ca"]) if t.get("client_ca") else None,
                              bool(t.get("require_client_cert", False)))
            if tls.require_client_cert and not tls.client_ca:
                self.error(("server", "tls", "require_client_cert"), "require_client_cert needs client_ca")
        return ServerSettings(
            host=str(raw.get("host", "127.0.0.1")), port=int(raw.get("port", DEFAULT_PORT)),
            journal=self.path(str(raw.get("journal", "journal.sqlite"))), tls=tls,
        )

    def security(self, raw: Mapping[str, Any]) -> SecuritySettings:
        rate = raw.get("rate_limit") or {}
        return SecuritySettings(
            secret=raw.get("secret"), admin_token=raw.get("admin_token"), path_token=raw.get("path_token"),
            allow_ips=self.networks(raw.get("allow_ips"), ("security", "allow_ips")),
            trusted_proxies=self.networks(raw.get("trusted_proxies"), ("security", "trusted_proxies")),
            rate_per_minute=rate.get("per_minute"),
            rate_burst=int(rate.get("burst", max(1, int(rate.get("per_minute", 60) // 10)))),
            max_body_bytes=int(raw.get("max_body_bytes", DEFAULT_MAX_BODY)),
        )

    def schedule(self, raw: Mapping[str, Any] | None, path: Path_) -> Schedule | None:
        if not raw:
            return None
        zone = str(raw.get("timezone", "UTC"))
        try:
            from zoneinfo import ZoneInfo
            ZoneInfo(zone)
        except Exception:
            self.error((*path, "timezone"), f"unknown time zone {zone!r}")
        start, end = 0, 24 * 60
        if "hours" in raw:
            first, _, last = str(raw["hours"]).partition("-")
            start = int(first[:2]) * 60 + int(first[3:5])
            end = int(last[:2]) * 60 + int(last[3:5])
            if start == end:
                self.error((*path, "hours"), "hours is an empty window")
        days = frozenset(_DAYS.index(d) for d in raw.get("days", _DAYS) if d in _DAYS)
        return Schedule(zone, days, start, end)

    def template(self, source: Any, path: Path_):
        try:
            return compile_template(str(source))
        except jinja2.TemplateSyntaxError as exc:
            self.error(path, f"template does not compile: {exc.message}")
            return None

    def order_validator(self, route: Mapping[str, Any], plugin_type: str, path: Path_):
        extra = []
        if route.get("schema"):
            try:
                validator, file = schemas.load_validator(str(route["schema"]), self.base_dir)
                extra.append((str(route["schema"]), validator))
                self.files.append(file)
            except schemas.SchemaLoadError as exc:
                self.error((*path, "schema"), str(exc))
        return schemas.order_validator(plugin_type, extra)

    def alert_schema(self, name: str | None, path: Path_) -> schemas.AlertSchema | None:
        if not name:
            return None
        try:
            validator, file = schemas.load_validator(name, self.base_dir)
        except schemas.SchemaLoadError as exc:
            self.error(path, str(exc))
            return None
        self.files.append(file)
        return schemas.AlertSchema(name, validator, schemas.fast_check(validator))

    def route(self, raw: Mapping[str, Any], defaults: Mapping[str, Any], plugins: Mapping[str, PluginSpec],
              path: Path_, alert_schemas: dict[str, schemas.AlertSchema | None]) -> Route | None:
        settings = {**defaults, **raw}
        name = str(raw.get("name", ""))
        to = str(raw.get("to", ""))
        if to not in plugins:
            self.error((*path, "to"), f"route {name!r} sends to undefined plugin {to!r}"
                       + (f"; defined: {', '.join(plugins)}" if plugins else ""))
        try:
            matcher = compile_block(raw.get("match"), ())
        except MatcherError as exc:
            self.error((*path, "match", *exc.path), str(exc), key=True)
            matcher = None
        order = None
        if raw.get("order") is not None:
            try:
                order = OrderTemplate(compile_order(raw["order"]))
            except OrderTemplateError as exc:
                self.error((*path, "order", *exc.path), f"{exc} (line {exc.error.lineno} of the template)")
        schema_name = settings.get("alert_schema")
        if schema_name not in alert_schemas:
            where = (*path, "alert_schema") if "alert_schema" in raw else ("defaults", "alert_schema")
            alert_schemas[schema_name] = self.alert_schema(schema_name, where)
        limits = settings.get("limits")
        route = Route(
            name=name, to=to, matcher=matcher or (lambda a: False), order=order,
            schema=self.order_validator(raw, plugins[to].type if to in plugins else "paper", path),
            alert_schema=alert_schemas[schema_name],
            continue_=bool(raw.get("continue", False)), enabled=bool(raw.get("enabled", True)),
            min_confidence=settings.get("min_confidence"), ack=str(settings.get("ack", "sync")),
            dedup_window=self.duration(settings, "dedup_window", path) or timedelta(seconds=60),
            dedup_key=self.template(settings["dedup_key"], (*path, "dedup_key")) if settings.get("dedup_key") else None,
            max_age=self.duration(settings, "max_age", path),
            time_field=str(settings.get("time_field", "time")),
            schedule=self.schedule(settings.get("schedule"), (*path, "schedule")),
            limits=Limits(limits.get("max_quantity"), limits.get("max_notional")) if limits else None,
        )
        return route if matcher else None


def _fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts and lists again, e.g. to pass settings to a library or to JSON."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def version_of(text: str, files: Iterable[Path]) -> str:
    """A hash over routes.yaml and every file it references (schemas, secret files)."""
    digest = hashlib.sha256(text.encode("utf-8"))
    for path in sorted(set(files)):
        digest.update(b"\0" + str(path).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()[:16]


def load(text: str, *, path: str | os.PathLike = "routes.yaml",
         env: Mapping[str, str] | None = None) -> RoutingTable | list[ConfigError]:
    """Turn routes.yaml's text into a RoutingTable, or every error found, each located."""
    file = str(path)
    base_dir = Path(path).absolute().parent  # not resolved: a `..data` symlink swap keeps paths stable
    data, located, yaml_errors = _parse_yaml(text)
    builder = _Builder(file, base_dir, located)
    for where, message in yaml_errors:
        builder.error_at(where, message)
    if data is None and not yaml_errors:
        builder.error_at((1, 1), "the file is empty; it needs at least `version: 1` and `plugins:`")
    if not isinstance(data, dict):
        if data is not None:
            builder.error_at((1, 1), "the file must be a mapping (version, plugins, routes, ...)")
        return sorted(set(builder.errors))

    secrets = _Secrets(os.environ if env is None else env, base_dir)
    substitution_errors: list = []
    # Templates (routes) keep `${...}` as written: a secret never flows into an order.
    resolved = {k: (v if k == "routes" else secrets.substitute(v, (k,), located, substitution_errors))
                for k, v in data.items()}
    for where, message in substitution_errors:
        builder.error_at(where, message)
    builder.files.extend(secrets.files)
    builder.check_schema(resolved)

    table = _build(builder, resolved, data, text, secrets)
    if builder.errors:
        return sorted(set(builder.errors))
    return table


def _build(b: _Builder, doc: dict[str, Any], raw: dict[str, Any], text: str, secrets: _Secrets) -> RoutingTable | None:
    """Build the table from a document that may still hold errors; every step is guarded."""
    def mapping(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    plugins: dict[str, PluginSpec] = {}
    for name, settings in mapping(doc.get("plugins")).items():
        if isinstance(settings, Mapping) and settings.get("type") in PLUGIN_TYPES:
            plugins[name] = PluginSpec(name, settings["type"], _freeze(dict(settings)), _fingerprint(settings))

    try:
        server = b.server(mapping(doc.get("server")))
        security = b.security(mapping(doc.get("security")))
    except (TypeError, ValueError, KeyError):
        return None  # shape errors already reported by the schema check

    defaults = dict(mapping(doc.get("defaults")))
    unmatched = str(doc.get("unmatched", "reject"))
    if unmatched not in ("reject", "drop") and unmatched not in plugins:
        b.error(("unmatched",), f"unmatched must be reject, drop or a plugin name; {unmatched!r} is not a plugin")

    routes: list[Route] = []
    names: dict[str, int] = {}
    alert_schemas: dict[str, schemas.AlertSchema | None] = {}
    for i, raw_route in enumerate(doc.get("routes") or ()):
        if not isinstance(raw_route, Mapping) or not isinstance(raw_route.get("name"), str):
            continue
        name = raw_route["name"]
        if name in names:
            b.error(("routes", i, "name"), f"duplicate route name {name!r} (first at route {names[name] + 1})")
            continue
        names[name] = i
        try:
            route = b.route(raw_route, defaults, plugins, ("routes", i), alert_schemas)
        except (TypeError, ValueError, KeyError, AttributeError):
            continue  # its shape is wrong: the schema check has said where
        if route is not None:
            routes.append(route)

    default_route = None
    try:
        default_route = b.route({"name": "unmatched", "to": unmatched if unmatched in plugins else next(iter(plugins), "")},
                                defaults, plugins, ("defaults",), alert_schemas) if plugins else None
    except (TypeError, ValueError, KeyError, AttributeError):
        pass
    if b.errors:
        return None
    return RoutingTable(
        version=version_of(text, b.files), source=b.file, routes=tuple(routes),
        plugins=MappingProxyType(plugins), unmatched=unmatched, enabled=bool(doc.get("enabled", True)),
        server=server, security=security, defaults=default_route,
        symbols=MappingProxyType(dict(mapping(doc.get("symbols")))),
        files=tuple(str(p) for p in sorted(set(b.files))), secrets=frozenset(secrets.values),
        document=_freeze(raw),
    )


def load_file(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> RoutingTable | list[ConfigError]:
    """Read and load a routes file; a file that cannot be read is one located error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [ConfigError(str(path), 1, 1, f"cannot read the routes file: {exc.strerror if isinstance(exc, OSError) else exc}")]
    return load(text, path=path, env=env)


def default_config_path(explicit: str | None = None) -> Path:
    """`-c FILE`, else $FKSROUTE_CONFIG, else ./routes.yaml."""
    return Path(explicit or os.environ.get("FKSROUTE_CONFIG") or "routes.yaml")
