"""JSON Schemas (Draft 2020-12): the alert, the order, each plugin's order, and routes.yaml."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jsonschema
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_PACKAGE = Path(__file__).resolve().parent


def builtin_dir() -> Path:
    """The shipped schemas: inside the installed package, or the repository's `schemas/`."""
    for candidate in (_PACKAGE / "schemas", _PACKAGE.parent / "schemas"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("fksroute's schemas/ folder is missing from the installation")


class SchemaLoadError(ValueError):
    """A schema file that is missing, not JSON, or not a valid Draft 2020-12 schema."""


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaLoadError(f"schema file {path.name} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaLoadError(f"schema file {path.name} is not valid JSON: {exc}") from None
    try:
        Draft202012Validator.check_schema(document)
    except jsonschema.SchemaError as exc:
        raise SchemaLoadError(f"schema file {path.name} is not a valid schema: {exc.message}") from None
    return document


@lru_cache(maxsize=1)
def builtin_registry() -> Registry:
    """Every shipped schema by its file name, so that `$ref: "paper.plugin.schema.json"` resolves."""
    resources = []
    for path in sorted(builtin_dir().glob("*.json")):
        document = _read_schema(path)
        resources.append((path.name, Resource.from_contents(document, default_specification=DRAFT202012)))
    return Registry().with_resources(resources)


def resolve_schema_path(name: str, base_dir: Path) -> Path:
    """A schema named in routes.yaml: next to routes.yaml first, else a shipped one."""
    local = (base_dir / name)
    if local.is_file():
        return local
    shipped = builtin_dir() / name
    if shipped.is_file():
        return shipped
    raise SchemaLoadError(f"schema file {name} not found next to the routes file or among the shipped schemas")


def load_validator(name: str, base_dir: Path) -> tuple[Draft202012Validator, Path]:
    """Compile the schema `name` once; returns the validator and the file it came from."""
    path = resolve_schema_path(name, base_dir)
    return Draft202012Validator(_read_schema(path), registry=builtin_registry()), path


@lru_cache(maxsize=None)
def builtin_validator(name: str) -> Draft202012Validator:
    return load_validator(name, builtin_dir())[0]


def fast_check(validator: Draft202012Validator) -> Callable[[Any], bool] | None:
    """A compiled `is_valid` for the common case (jsonschema-rs); the Python validator then only
    runs to explain an invalid instance. None when the schema needs what only Python resolves."""
    try:
        import jsonschema_rs

        compiled = jsonschema_rs.validator_for(validator.schema)
    except Exception:
        return None
    return compiled.is_valid


def _errors(validator: Draft202012Validator, fast: Callable[[Any], bool] | None,
            instance: Any) -> list[jsonschema.ValidationError]:
    try:
        if fast is not None and fast(instance):
            return []
    except (ValueError, TypeError):
        pass  # not plain JSON data (a template returned a date, say): let Python say why
    return sorted_errors(validator, instance)


def field_path(error: jsonschema.ValidationError) -> str:
    """The dotted path of the field an error is about ('' for the whole document)."""
    return ".".join(str(p) for p in error.absolute_path)


def describe(error: jsonschema.ValidationError) -> str:
    """A one-line message that names the field."""
    where = field_path(error)
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        full = f"{where}.{missing}" if where else missing
        return f"missing required field {full}"
    return f"{where or 'document'}: {error.message}"


def sorted_errors(validator: Draft202012Validator, instance: Any) -> list[jsonschema.ValidationError]:
    """All errors, deepest-first within each field, in a stable order."""
    return sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.validator))


@dataclass(frozen=True)
class AlertProblem:
    """Why an alert was refused: 400 for a field with an invalid value, 422 for a missing one."""

    status: int
    message: str


@dataclass(frozen=True)
class AlertSchema:
    """An alert schema; its top-level `default`s are filled into the alert."""

    name: str
    validator: Draft202012Validator
    fast: Callable[[Any], bool] | None = None
    defaults: tuple[tuple[str, Any], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        properties = self.validator.schema.get("properties", {})
        object.__setattr__(self, "defaults", tuple(
            (key, spec["default"]) for key, spec in properties.items() if isinstance(spec, Mapping) and "default" in spec))

    def apply(self, alert: Mapping[str, Any]) -> tuple[dict[str, Any], AlertProblem | None]:
        filled = dict(alert)
        for key, default in self.defaults:
            if filled.get(key) is None:
                filled[key] = copy.deepcopy(default) if isinstance(default, (dict, list)) else default
        errors = _errors(self.validator, self.fast, filled)
        if not errors:
            return filled, None
        # A present field with a bad value answers 400 ("Invalid action: x"); a missing one 422.
        for error in errors:
            if error.validator != "required" and error.absolute_path:
                name = str(error.absolute_path[0])
                value = filled.get(name)
                shown = value if isinstance(value, str) else json.dumps(value)
                return filled, AlertProblem(400, f"Invalid {name}: {shown}")
        return filled, AlertProblem(422, describe(errors[0]))


@dataclass(frozen=True)
class OrderValidator:
    """The checks a rendered order must pass: the canonical order, its plugin's, its route's."""

    validators: tuple[tuple[str, Draft202012Validator, Callable[[Any], bool] | None], ...]
    all_valid: Callable[[Any], bool] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One compiled check for the whole chain (allOf): a valid order, the common case, costs one
        # call; the chain is walked only to say which schema an invalid one fails and why.
        combined = None
        if self.validators and all(fast is not None for _, _, fast in self.validators):
            combined = fast_check(Draft202012Validator({"allOf": [v.schema for _, v, _ in self.validators]}))
        object.__setattr__(self, "all_valid", combined)

    def errors(self, order: Mapping[str, Any]) -> list[str]:
        try:
            if self.all_valid is not None and self.all_valid(order):
                return []
        except (ValueError, TypeError):
            pass  # not plain JSON data: the chain below lets Python say why
        found: list[str] = []
        for name, validator, fast in self.validators:
            found.extend(f"{describe(e)} ({name})" for e in _errors(validator, fast, order))
            if found:
                break
        return found


def order_validator(plugin_type: str, extra: Iterable[tuple[str, Draft202012Validator]] = ()) -> OrderValidator:
    """Validators for an order going to a plugin of `plugin_type`, plus a route's own schema."""
    names = ["order.schema.json"]
    if (builtin_dir() / f"{plugin_type}.order.schema.json").is_file():
        names.append(f"{plugin_type}.order.schema.json")
    chain = [(name, builtin_validator(name), builtin_fast_check(name)) for name in names]
    chain.extend((name, validator, fast_check(validator)) for name, validator in extra)
    return OrderValidator(tuple(chain))


@lru_cache(maxsize=None)
def builtin_fast_check(name: str) -> Callable[[Any], bool] | None:
    return fast_check(builtin_validator(name))
