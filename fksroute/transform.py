"""Turn an alert into an order: every string leaf of `order:` is a sandboxed Jinja template."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, islice
from typing import Any, Callable, Collection, Iterable, Mapping

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
    if found is None or _expression_node(template) is None:
        return None
    return found.group(1)


def _expression_node(template: Template) -> nodes.Expr | None:
    """The parsed EXPR of a template whose whole output is one `{{ EXPR }}`, else None."""
    body = ENVIRONMENT.parse(template.source).body
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1 \
            or isinstance(body[0].nodes[0], nodes.TemplateData):
        return None
    return body[0].nodes[0]


def _combined(tree: Any) -> jinja2.Template | None:
    """One template that computes every leaf of a flat order at once, as a list, so an order costs
    one render instead of one per field. None when some leaf is more than one expression."""
    if not isinstance(tree, dict):
        return None
    expressions = []
    for value in tree.values():
        if isinstance(value, Template):
            expression = _expression(value)
            node = _expression_node(value) if expression is not None else None
            if node is None or not _uses_alert(node):
                return None  # a constant leaf: Jinja folds it into text, which a list would not
            expressions.append(f"({expression})")
        elif isinstance(value, (dict, list)):
            return None
    if not expressions:
        return None
    try:
        return ENVIRONMENT.from_string("{{ [" + ", ".join(expressions) + "] }}")
    except jinja2.TemplateSyntaxError:
        return None


# The fast path: a flat order whose templates are all simple expressions (alert fields, constants,
# `default`, `float`) is computed by small Python closures, without Jinja: a few µs instead of ~20.
# It answers only when it gets exactly Jinja's result; a missing field or any failure is left to
# Jinja, so error messages stay Jinja's. Only dict lookups and the two filters run: nothing in the
# sandbox is reachable, and alert text is never evaluated.

_UNDEFINED = object()  # a field the alert does not have, as StrictUndefined is to Jinja


class _Slow(Exception):
    """Jinja renders this: not a simple expression, or a value Jinja would fail on."""


Evaluate = Callable[[dict], Any]


# A leaf of the fast path: (key, field, default, None) reads `alert.get(field, default)`, the
# common case, without a call of its own; (key, None, None, closure) computes the rest.
FastLeaf = tuple[Any, Any, Any, "Evaluate | None"]


def _fast_order(tree: Any) -> tuple[FastLeaf, ...] | None:
    """The leaves of a flat order whose templates are all simple, else None."""
    if not isinstance(tree, dict):
        return None
    leaves: list[FastLeaf] = []
    try:
        for key, leaf in tree.items():
            if isinstance(leaf, Template):
                evaluate = _fast_leaf(leaf)
                read = getattr(evaluate, "reads", None)
                leaves.append((key, *read, None) if read is not None else (key, None, None, evaluate))
            elif isinstance(leaf, (dict, list)):
                return None
            else:
                leaves.append((key, None, None, _constant(leaf)))
    except _Slow:
        return None
    return tuple(leaves)


def _fast_leaf(template: Template) -> Evaluate:
    text = _text(template)
    if text is not None:
        return _constant(text)
    expression = _expression_node(template)
    if expression is None or not _uses_alert(expression):
        # A constant: Jinja folds it into text at compile time (`{{ 1 }}` renders "1").
        raise _Slow
    return _fast(expression)


def _text(template: Template) -> str | None:
    """What a template without any Jinja in it (`market`) renders: its text."""
    body = ENVIRONMENT.parse(template.source).body
    if len(body) == 1 and isinstance(body[0], nodes.Output) and len(body[0].nodes) == 1 \
            and isinstance(body[0].nodes[0], nodes.TemplateData):
        return body[0].nodes[0].data
    return None


def _uses_alert(node: nodes.Expr) -> bool:
    """Whether `node` reads a name (only `alert` is simple); if not, Jinja computes it when compiling."""
    return isinstance(node, nodes.Name) or node.find(nodes.Name) is not None


def _fast(node: nodes.Node) -> Evaluate:
    """The closure computing `node` from the alert: its value, or _UNDEFINED for a missing field."""
    if isinstance(node, nodes.Const):
        return _constant(_const_value(node))
    name = _alert_field(node)
    if name is not None:
        return _read(name, _UNDEFINED)
    if isinstance(node, nodes.Filter) and not node.kwargs and node.dyn_args is None \
            and node.dyn_kwargs is None and node.node is not None:
        function = ENVIRONMENT.filters.get(node.name)
        if function is jinja2.filters.do_default and len(node.args) == 1:
            return _fast_default(node.node, node.args[0])
        if function is jinja2.filters.do_float and not node.args:
            return _fast_float(node.node)
    raise _Slow


def _constant(value: Any) -> Evaluate:
    return lambda alert: value


def _read(name: str, default: Any) -> Evaluate:
    """`alert.get(name, default)`: a closure that says what it reads (`reads`), so that the
    fast path can read it in line."""
    def evaluate(alert: dict) -> Any:
        return alert.get(name, default)
    evaluate.reads = (name, default)  # type: ignore[attr-defined]
    return evaluate


def _const_value(node: nodes.Const) -> Any:
    """A literal's value; Jinja writes an infinite float (`1e400`) back as `inf`, which fails."""
    if isinstance(node.value, float) and not math.isfinite(node.value):
        raise _Slow
    return node.value


def _alert_field(node: nodes.Node) -> str | None:
    """NAME of `alert.NAME` or `alert['NAME']` when that is the field NAME: not for a dict's own
    attributes, where Jinja returns the bound method (`alert.items`)."""
    if isinstance(node, nodes.Getattr):
        target, name = node.node, node.attr
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        target, name = node.node, node.arg.value
    else:
        return None
    if isinstance(target, nodes.Name) and target.name == "alert" and isinstance(name, str) \
            and not hasattr({}, name):
        return name
    return None


def _fast_default(value_node: nodes.Expr, default_node: nodes.Expr) -> Evaluate:
    """`value | default(X)`: X when value is undefined (None is a value). Jinja computes X first
    either way, so an X that can fail (`alert.q | float`) is computed first here too."""
    value = _fast(value_node)
    if isinstance(default_node, nodes.Const):
        constant = _const_value(default_node)
        name = _alert_field(value_node)
        if name is not None:
            return _read(name, constant)
        return lambda alert: constant if (v := value(alert)) is _UNDEFINED else v
    fallback = _fast(default_node)
    if _alert_field(default_node) is not None:
        return lambda alert: fallback(alert) if (v := value(alert)) is _UNDEFINED else v

    def first_the_default(alert: dict) -> Any:
        default = fallback(alert)
        found = value(alert)
        return default if found is _UNDEFINED else found
    return first_the_default


def _fast_float(value_node: nodes.Expr) -> Evaluate:
    """`value | float` with Jinja's own filter; Jinja fails on an undefined value (StrictUndefined).
    Not for a constant: Jinja computes that at compile time, and `'inf' | float` then fails."""
    if not _uses_alert(value_node):
        raise _Slow
    value = _fast(value_node)
    do_float = jinja2.filters.do_float

    def evaluate(alert: dict) -> Any:
        found = value(alert)
        if found is _UNDEFINED:
            raise _Slow
        return do_float(found)
    return evaluate


def _render_fast(leaves: tuple[FastLeaf, ...], alert: Any) -> dict[str, Any] | None:
    """The order from the leaves, or None when Jinja has to render it (and word the error)."""
    if type(alert) is not dict:
        return None
    out = {}
    get = alert.get
    try:
        for key, name, default, evaluate in leaves:
            value = get(name, default) if evaluate is None else evaluate(alert)
            if value is not None:
                if value is _UNDEFINED:
                    return None
                out[key] = value
    except Exception:  # an overflowing float, say: Jinja fails the same way and words it
        return None
    return out


@dataclass(frozen=True)
class OrderTemplate:
    """A route's `order:` mapping with each string leaf compiled."""

    tree: Any
    fast: tuple[FastLeaf, ...] | None = field(default=None, init=False, repr=False, compare=False)
    combined: jinja2.Template | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fast", _fast_order(self.tree))
        object.__setattr__(self, "combined", _combined(self.tree))

    def render(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """Render every leaf; a leaf that renders to None is left out of the order."""
        out = self.render_fast(variables.get("alert"))
        return out if out is not None else self.render_jinja(variables)

    def render_fast(self, alert: Any) -> dict[str, Any] | None:
        """The order without Jinja, when every leaf is simple and the alert has what they read;
        else None, and `render_jinja` renders it (and words any error)."""
        return _render_fast(self.fast, alert) if self.fast is not None else None

    def render_jinja(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """`render` without the fast path: Jinja renders the order."""
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
