"""The `fksroute` command. Every subcommand uses the daemon's own loader and planner."""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml

from fksroute import __version__, config


def _load_or_report(path: str | None, out_format: str = "text") -> Any:
    table = config.load_file(config.default_config_path(path))
    if isinstance(table, list):
        if out_format == "json":
            print(json.dumps({"ok": False, "errors": [e.as_dict() for e in table]}, indent=2))
        else:
            for error in table:
                print(error, file=sys.stderr)
        return None
    return table


def _read_alert_text(spec: str) -> str:
    if spec == "-":
        return sys.stdin.read()
    if spec.startswith("@"):
        return Path(spec[1:]).read_text(encoding="utf-8")
    return spec


def _alert_from(spec: str) -> dict[str, Any]:
    from fksroute.security import strip_secret
    from fksroute.webhook import parse_alert

    text = _read_alert_text(spec)
    content_type = "application/json" if text.lstrip().startswith("{") else "text/plain"
    return strip_secret(parse_alert(text.encode("utf-8"), content_type))


# --- subcommands ------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from fksroute.logs import setup_logging
    from fksroute.server import serve

    setup_logging(args.log_level)
    return serve(config.default_config_path(args.config), args.host, args.port)


def cmd_check(args: argparse.Namespace) -> int:
    table = _load_or_report(args.config, args.format)
    if table is None:
        return 1
    if args.format == "json":
        print(json.dumps({"ok": True, "errors": [], "version": table.version,
                          "routes": [r.name for r in table.routes], "plugins": list(table.plugins)}, indent=2))
    else:
        print(f"{table.source}: OK, version {table.version}: {len(table.routes)} routes, "
              f"plugins {', '.join(table.plugins)}")
    return 0


def plan_json(table: Any, alert: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    from fksroute.plan import plan_alert

    plan = plan_alert(table, alert, now)
    rejection = plan.rejection
    return {
        "version": table.version,
        "alert": alert,
        "accepted": rejection is None,
        "status": rejection.status if rejection else 200,
        "error": rejection.error if rejection else None,
        "routes": plan.routes,
        "orders": [o.as_dict() for o in plan.orders],
        "ack": plan.ack,
    }


def cmd_route(args: argparse.Namespace) -> int:
    from fksroute.webhook import BadAlert

    table = _load_or_report(args.config)
    if table is None:
        return 1
    try:
        alert = _alert_from(args.alert)
    except (OSError, BadAlert) as exc:
        print(json.dumps({"accepted": False, "status": 400, "error": str(exc)}, indent=2))
        return 1
    result = plan_json(table, alert)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["accepted"] else 1


def _case_failures(table: Any, case: dict[str, Any]) -> list[str]:
    expect = case.get("expect") or {}
    now = case.get("now")
    when = datetime.fromisoformat(str(now).replace("Z", "+00:00")) if now else None
    alert = case.get("alert")
    if not isinstance(alert, dict):
        return ["the case has no `alert:` mapping"]
    got = plan_json(table, alert, when)
    failures: list[str] = []
    if "status" in expect and got["status"] != expect["status"]:
        failures.append(f"status: expected {expect['status']}, got {got['status']} ({got['error']})")
    if "error" in expect and str(expect["error"]) not in str(got["error"]):
        failures.append(f"error: expected it to contain {expect['error']!r}, got {got['error']!r}")
    if "routes" in expect and got["routes"] != list(expect["routes"]):
        failures.append(f"routes: expected {expect['routes']}, got {got['routes']}")
    if "skipped" in expect:
        skipped = [o["route"] for o in got["orders"] if o["status"] == "skipped"]
        if skipped != list(expect["skipped"]):
            failures.append(f"skipped: expected {expect['skipped']}, got {skipped}")
    for i, wanted in enumerate(expect.get("orders") or ()):
        orders = [o for o in got["orders"] if o["status"] == "ready"]
        if i >= len(orders):
            failures.append(f"orders[{i}]: expected {wanted}, but only {len(orders)} orders were planned")
            continue
        for key, value in (wanted or {}).items():
            actual = orders[i]["order"].get(key, "<missing>")
            if actual != value:
                failures.append(f"orders[{i}].{key}: expected {value!r}, got {actual!r}")
    if not expect:
        failures.append("the case has no `expect:`")
    return failures


def cmd_test(args: argparse.Namespace) -> int:
    try:
        document = yaml.safe_load(Path(args.cases).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        print(f"{args.cases}: cannot read the cases: {exc}", file=sys.stderr)
        return 1
    cases = document.get("cases") if isinstance(document, dict) else document
    if not isinstance(cases, list):
        print(f"{args.cases}: expected a list of cases (or `cases:`)", file=sys.stderr)
        return 1
    config_path = args.config
    if config_path is None and isinstance(document, dict) and document.get("config"):
        config_path = str(Path(args.cases).parent / document["config"])
    table = _load_or_report(config_path)
    if table is None:
        return 1
    passed = failed = 0
    for i, case in enumerate(cases):
        name = (case or {}).get("name", f"case {i + 1}") if isinstance(case, dict) else f"case {i + 1}"
        failures = _case_failures(table, case) if isinstance(case, dict) else ["a case must be a mapping"]
        if failures:
            failed += 1
            print(f"FAIL {name}")
            for failure in failures:
                print(f"     {failure}")
        else:
            passed += 1
            print(f"PASS {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _server_section(path: Path) -> dict[str, Any]:
    """`server:` as written, for when the whole file does not load (a secret missing in this shell,
    or the very mistake a reload is about to report): it needs no secrets, and the daemon took it at start."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        server = document.get("server") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return server if isinstance(server, dict) else {}


def _default_url(config_path: str | None) -> str:
    path = config.default_config_path(config_path)
    table = config.load_file(path)
    if isinstance(table, list):
        raw = _server_section(path)
        host, port, tls = str(raw.get("host", "127.0.0.1")), raw.get("port", config.DEFAULT_PORT), raw.get("tls")
    else:
        host, port, tls = table.server.host, table.server.port, table.server.tls
    host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _tls(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """How `reload` checks the daemon's certificate, and the client certificate it shows (for a
    daemon with `server.tls.require_client_cert`)."""
    if args.insecure:
        return False
    context = ssl.create_default_context(cafile=args.cacert)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    return context


def cmd_reload(args: argparse.Namespace) -> int:
    import httpx

    url = (args.url or _default_url(args.config)).rstrip("/")
    token = args.token or os.environ.get("FKSROUTE_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url}/-/reload", headers=headers, timeout=60, verify=_tls(args))
    except httpx.HTTPError as exc:
        print(f"reload: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    try:
        outcome = response.json()
    except ValueError:
        print(f"reload: unexpected answer {response.status_code}: {response.text[:200]}", file=sys.stderr)
        return 1
    if response.status_code == 200 and outcome.get("ok"):
        print(f"reloaded: version {outcome.get('version')}, generation {outcome.get('generation')}"
              + ("" if outcome.get("changed", True) else " (unchanged)"))
        return 0
    print("reload refused; the previous table stays in force:", file=sys.stderr)
    for error in outcome.get("errors") or [f"HTTP {response.status_code}"]:
        print(error, file=sys.stderr)
    return 1


def cmd_send(args: argparse.Namespace) -> int:
    import httpx

    from fksroute.security import PASSPHRASE, SIGNATURE_HEADER, sign

    text = _read_alert_text(args.alert)
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    body = text.encode("utf-8")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        headers["Content-Type"] = "application/json"
        if args.secret and not args.hmac:
            body = json.dumps({**parsed, PASSPHRASE: args.secret}).encode("utf-8")
    if args.secret and args.hmac:
        headers[SIGNATURE_HEADER] = sign(body, args.secret)
    try:
        response = httpx.post(args.url, content=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"send: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"HTTP {response.status_code}")
    print(response.text)
    return 0 if response.status_code < 300 else 1


def _journal_path(config_path: str | None) -> Path:
    path = config.default_config_path(config_path)
    table = config.load_file(path)
    if not isinstance(table, list):
        return table.server.journal
    return path.absolute().parent / str(_server_section(path).get("journal", "journal.sqlite"))


def cmd_journal(args: argparse.Namespace) -> int:
    import sqlite3

    from fksroute.journal import read_recent

    path = _journal_path(args.config)
    if not path.exists():
        print(f"no journal at {path} yet", file=sys.stderr)
        return 1
    try:
        entries = read_recent(path, args.limit, args.alert)
    except sqlite3.Error as exc:
        print(f"cannot read the journal {path}: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(entries, indent=2, default=str))
        return 0
    if not entries:
        print("no such alert" if args.alert else "the journal is empty")
        return 1 if args.alert else 0
    for entry in entries:
        when = datetime.fromtimestamp(entry["received_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        reason = f" ({entry['reason']})" if entry["reason"] else ""
        extra = f" duplicate of {entry['duplicate_of']}" if entry["duplicate_of"] else ""
        print(f"{when}Z {entry['id']} from {entry['source'] or '-'}: {entry['outcome']}{reason} "
              f"HTTP {entry['http_status'] or '-'}{extra}")
        if entry["reply"] and entry["reply"].get("error") and not entry["orders"]:
            print(f"    error: {entry['reply']['error']}")
        if args.alert and entry["body"]:
            print(f"    alert: {entry['body']}")
        for order in entry["orders"]:
            fill = ""
            if order["filled_quantity"] is not None:
                fill = f" filled {order['filled_quantity']:g}"
                if order["average_price"] is not None:
                    fill += f" @ {order['average_price']:g}"
            error = f" error: {order['error']}" if order["error"] else ""
            if order["status"] == "skipped" and (order["detail"] or {}).get("reason"):
                error += f" ({order['detail']['reason']})"
            print(f"    {order['route']} -> {order['plugin']}: {order['status'] or order['state']}"
                  f" order {order['order_id'] or '-'} (client {order['client_order_id']}){fill}{error}")
    return 0


# --- the parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fksroute", description="Route trading alerts to execution venues.")
    parser.add_argument("--version", action="version", version=f"fksroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", help="routes file (default: $FKSROUTE_CONFIG, else ./routes.yaml)")
        return p

    p = with_config(sub.add_parser("serve", help="run the daemon"))
    p.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: server.port, 4700)")
    p.add_argument("--log-level", default=os.environ.get("FKSROUTE_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("check", help="check a routes file; exit 1 with every error"))
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_check)

    p = with_config(sub.add_parser("route", help="dry run: the routes and orders an alert would produce"))
    p.add_argument("alert", metavar="ALERT", help="JSON text, @path, or - for stdin")
    p.set_defaults(func=cmd_route)

    p = with_config(sub.add_parser("test", help="run routing unit tests from a cases file"))
    p.add_argument("cases", metavar="CASES.yaml")
    p.set_defaults(func=cmd_test)

    p = with_config(sub.add_parser("reload", help="ask the running daemon to reload and wait for the outcome"))
    p.add_argument("--url", help="the daemon's base URL (default: from the routes file's server:)")
    p.add_argument("--token", help="admin token (default: $FKSROUTE_ADMIN_TOKEN); not needed on loopback")
    p.add_argument("--insecure", action="store_true", help="do not verify the daemon's TLS certificate")
    p.add_argument("--cacert", metavar="FILE", help="CA to verify the daemon's certificate with (HTTPS)")
    p.add_argument("--cert", metavar="FILE", help="client certificate, when server.tls requires one")
    p.add_argument("--key", metavar="FILE", help="the client certificate's key")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("send", help="send one alert as TradingView would, and print the reply")
    p.add_argument("url", metavar="URL")
    p.add_argument("alert", metavar="ALERT", help="JSON or plain text, @path, or - for stdin")
    p.add_argument("--secret", help="put this passphrase in the body (or, with --hmac, sign with it)")
    p.add_argument("--hmac", action="store_true", help="sign the body (X-Webhook-Signature) instead")
    p.set_defaults(func=cmd_send)

    p = with_config(sub.add_parser("journal", help="recent alerts and what became of them"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--alert", metavar="ID", help="one alert, with its body")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_journal)

    try:
        from fksroute.agents.main import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        raise
