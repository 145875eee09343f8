"""Turn an alert into an order: every string leaf of `order:` is a sandboxed Jinja template."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, islice
from typing import Any, Collection, Iterable, Mapping

import jinja2
from jinja2 import nodes
from jinja2.nativetypes import NativeEnvironment, NativeTemplate
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError


class TransformError(ValueError):
    """A template that failed to render; the message is safe to send back to the client."""


def _native_concat(values: Iterable[Any]) -> Any:
    """One expression keeps its native type; anything longer is text.

    Unlike Jinja's own native mode, text is never parsed back into Python literals, so
    an alert field "[1, 2]" stays a string: alert text is data.
    """
    head = list(islice(values, 2))
    if not head:
        return None
    if len(head) == 1:
        if isinstance(head[0], jinja2.Undefined):
            str(head[0])  # a strict or unsafe undefined raises here, naming what was missing
        return head[0]
    return "".join(str(v) for v in chain(head, values))


class SandboxedNativeEnvironment(NativeEnvironment, ImmutableSandboxedEnvironment):
    """Jinja's sandbox (no Python internals, no mutation) with native result types."""

    concat = staticmethod(_native_concat)  # type: ignore[assignment]


class _Template(NativeTemplate):
    # NativeTemplate calls `environment_class.concat`: point it at ours, not Jinja's literal_eval.
    environment_class = SandboxedNativeEnvironment


SandboxedNativeEnvironment.template_class = _Template


@jinja2.pass_context
def _tv_symbol(context: jinja2.runtime.Context, ticker: Any) -> str:
    from fksroute.symbols import tv_symbol

    return tv_symbol(str(ticker), context.get("_markets", ()), context.get("_symbols", {}))


def _environment() -> SandboxedNativeEnvironment:
    env = SandboxedNativeEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["tv_symbol"] = _tv_symbol
    return env


ENVIRONMENT = _environment()
_MISSING_FIELD = re.compile(r"has no attribute '([^']*)'|'([^']*)' is undefined")


def _explain(exc: Exception) -> str:
    if isinstance(exc, SecurityError):
        return f"unsafe template: {exc}"
    if isinstance(exc, jinja2.UndefinedError):
        found = _MISSING_FIELD.search(str(exc))
        name = next((g for g in found.groups() if g), None) if found else None
        return f"missing field {name}" if name else str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Template:
    """One compiled template string."""

    source: str
    compiled: jinja2.Template

    def render(self, variables: Mapping[str, Any]) -> Any:
        """Render with `variables` (the names a template sees)."""
        return self.render_shared(with_globals(variables))

    def render_shared(self, names: dict[str, Any]) -> Any:
        """Render with names from `with_globals`, used as they are: no copy per template."""
        compiled = self.compiled
        try:
            return _native_concat(compiled.root_render_func(compiled.new_context(names, shared=True)))
        except Exception as exc:  # any template failure is the alert's problem, never a crash
            raise TransformError(_explain(exc)) from None


def with_globals(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Jinja's globals plus `variables`, built once per alert and shared by all its templates."""
    return {**ENVIRONMENT.globals, **variables}


def compile_template(source: str) -> Template:
    """Compile one template; raises jinja2.TemplateSyntaxError with the line inside the text."""
    return Template(source, ENVIRONMENT.from_string(source))


_ONE_EXPRESSION = re.compile(r"^\{\{(.*)\}\}$", re.DOTALL)


def _expression(template: Template) -> str | None:
    """The EXPR of a template that is nothing but `{{ EXPR }}`, else None."""
    found = _ONE_EXPRESSION.match(template.source)
    if found is None:
        return None
    body = ENVIRONMENT.parse(template.source).body
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1 \
            or isinstance(body[0].nodes[0], nodes.TemplateData):
        return None
    return found.group(1)


def _combined(tree: Any) -> jinja2.Template | None:
    """One template that computes every leaf of a flat order at once, as a list, so an order costs
    one render instead of one per field. None when some leaf is more than one expression."""
    if not isinstance(tree, dict):
        return None
    expressions = []
    for value in tree.values():
        if isinstance(value, Template):
            expression = _expression(value)
            if expression is None:
                return None
            expressions.append(f"({expression})")
        elif isinstance(value, (dict, list)):
            return None
    if not expressions:
        return None
    try:
        return ENVIRONMENT.from_string("{{ [" + ", ".join(expressions) + "] }}")
    except jinja2.TemplateSyntaxError:
        return None


@dataclass(frozen=True)
class OrderTemplate:
    """A route's `order:` mapping with each string leaf compiled."""

    tree: Any
    combined: jinja2.Template | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "combined", _combined(self.tree))

    def render(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """Render every leaf; a leaf that renders to None is left out of the order."""
        names = with_globals(variables)
        if self.combined is not None:
            try:
                values = iter(_native_concat(self.combined.root_render_func(
                    self.combined.new_context(names, shared=True))))
                out = {}
                for key, leaf in self.tree.items():
                    value = next(values) if isinstance(leaf, Template) else leaf
                    if isinstance(value, jinja2.Undefined):
                        raise TransformError("undefined")
                    if value is not None:
                        out[key] = value
                return out
            except Exception:
                pass  # rendered leaf by leaf below, which names the field that failed
        return _render(self.tree, names, ())


def compile_order(tree: Any, path: tuple = ()) -> Any:
    """Compile every string leaf of a nested structure; raises (path, TemplateSyntaxError)."""
    if isinstance(tree, Mapping):
        return {k: compile_order(v, (*path, k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [compile_order(v, (*path, i)) for i, v in enumerate(tree)]
    if isinstance(tree, str):
        try:
            return compile_template(tree)
        except jinja2.TemplateSyntaxError as exc:
            raise OrderTemplateError(path, exc) from None
    return tree


class OrderTemplateError(ValueError):
    def __init__(self, path: tuple, error: jinja2.TemplateSyntaxError) -> None:
        super().__init__(f"template does not compile: {error.message}")
        self.path = path
        self.error = error


def _render(node: Any, variables: Mapping[str, Any], path: tuple) -> Any:
    if isinstance(node, Template):
        try:
            return node.render_shared(variables)
        except TransformError as exc:
            where = ".".join(str(p) for p in path) or "order"
            raise TransformError(f"order.{where}: {exc}") from None
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            rendered = _render(value, variables, (*path, key))
            if rendered is not None:
                out[key] = rendered
        return out
    if isinstance(node, list):
        return [_render(v, variables, (*path, i)) for i, v in enumerate(node)]
    return node


def variables(alert: Mapping[str, Any], route: str, now: datetime,
              markets: Collection[str] = (), symbols: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The names a template sees: `alert`, `route`, `now` (and what `tv_symbol` needs)."""
    return {"alert": alert, "route": route, "now": now, "_markets": markets, "_symbols": symbols or {}}


# A route without `order:` sends the alert's own fields, under TradingView's usual names too.
DEFAULT_ORDER = OrderTemplate(compile_order({
    "symbol": "{{ alert.symbol | default(alert.ticker) }}",
    "side": "{{ alert.side | default(alert.action) }}",
    "type": "{{ alert.type | default(alert.order_type) | default('market') }}",
    "quantity": "{{ alert.quantity | default(alert.contracts) | float }}",
    "price": "{{ alert.price | default(none) }}",
    "stop_price": "{{ alert.stop_price | default(none) }}",
    "stop_loss": "{{ alert.stop_loss | default(none) }}",
    "take_profit": "{{ alert.take_profit | default(none) }}",
    "time_in_force": "{{ alert.time_in_force | default(none) }}",
    "account": "{{ alert.account | default(none) }}",
    "confidence": "{{ alert.confidence | default(none) }}",
}))
