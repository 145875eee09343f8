"""The loader: strict, located errors; secrets substituted and never shown."""

import json
from pathlib import Path

import pytest

from fksroute import config
from fksroute.routing import RoutingTable

ROOT = Path(__file__).parent.parent

MINIMAL = """\
version: 1
plugins:
  paper: {type: paper}
routes:
  - name: all
    to: paper
"""


def load(text, tmp_path, env=None, name="routes.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return config.load(text, path=path, env=env or {})


def messages(errors):
    return [(e.line, e.message) for e in errors]


def test_shipped_routes_load():
    table = config.load_file(ROOT / "routes.yaml", env={})
    assert isinstance(table, RoutingTable)
    assert [r.name for r in table.routes] == ["paper-all"]
    assert table.plugins["paper"].type == "paper"
    assert table.server.port == 4700


def test_minimal_table(tmp_path):
    table = load(MINIMAL, tmp_path)
    assert isinstance(table, RoutingTable)
    assert table.unmatched == "reject"
    assert len(table.version) == 16


@pytest.mark.parametrize("text, line, fragment", [
    (MINIMAL + "bogus: 1\n", 7, "unknown key 'bogus'"),
    (MINIMAL.replace("  paper: {type: paper}", "  paper: {type: paper, slipage: 1}"), 3, "unknown key 'slipage'"),
    (MINIMAL.replace("    to: paper", "    to: nowhere"), 6, "undefined plugin 'nowhere'"),
    (MINIMAL + "  - name: all\n    to: paper\n", 7, "duplicate route name 'all'"),
    (MINIMAL.replace("version: 1\n", "version: 1\nversion: 1\n"), 2, "duplicate key 'version'"),
    (MINIMAL + "    match: {symbol: {regex: '[A-'}}\n", 7, "invalid regex"),
    (MINIMAL + "    match: {qty: {gtx: 1}}\n", 7, "unknown key 'gtx'"),
    (MINIMAL + "    order: {symbol: '{{ alert.symbol '}\n", 7, "template does not compile"),
    (MINIMAL + "    schema: nothere.schema.json\n", 7, "nothere.schema.json not found"),
    (MINIMAL + "unmatched: ghost\n", 7, "'ghost' is not a plugin"),
    ("version: 1\nplugins: [\n", 3, "YAML syntax"),
    (MINIMAL + "defaults: {dedup_window: 10 parsecs}\n", 7, "dedup_window"),
    (MINIMAL + "security: {allow_ips: [not-an-ip]}\n", 7, "'not-an-ip' is not an address"),
])
def test_each_mistake_is_located(tmp_path, text, line, fragment):
    errors = load(text, tmp_path)
    assert isinstance(errors, list), "expected errors"
    assert any(e.line == line and fragment in e.message for e in errors), messages(errors)
    assert all(e.file.endswith("routes.yaml") and e.column >= 1 for e in errors)


def test_several_mistakes_all_reported(tmp_path):
    text = """\
version: 1
plugins:
  paper: {type: paper}
routes:
  - name: a
    to: papr
  - name: b
    to: paper
    typo: 1
  - name: c
    to: paper
    match: {symbol: {regex: '('}}
"""
    errors = load(text, tmp_path)
    assert [e.line for e in errors] == [6, 9, 12]


def test_a_schema_that_is_not_json_is_an_error(tmp_path):
    (tmp_path / "bad.schema.json").write_text("{not json")
    errors = load(MINIMAL + "    schema: bad.schema.json\n", tmp_path)
    assert any("not valid JSON" in e.message for e in errors)


def test_env_file_and_cred_substitution(tmp_path):
    (tmp_path / "secret.txt").write_text("from-a-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "relay").write_text("from-a-credential")
    text = MINIMAL.replace("  paper: {type: paper}", """\
  paper: {type: paper}
  relay: {type: http, url: "http://127.0.0.1:1/x", secret: "${cred:relay}"}""") + """\
security:
  secret: ${env:HOOK_SECRET}
  admin_token: ${file:secret.txt}
"""
    table = load(text, tmp_path, env={"HOOK_SECRET": "s3cret-value", "CREDENTIALS_DIRECTORY": str(creds)})
    assert isinstance(table, RoutingTable), table
    assert table.security.secret == "s3cret-value"
    assert table.security.admin_token == "from-a-file"
    assert table.plugins["relay"].settings["secret"] == "from-a-credential"
    assert {"s3cret-value", "from-a-file", "from-a-credential"} <= table.secrets
    # What /routes shows is the file as written: references, not values.
    assert table.document["security"]["secret"] == "${env:HOOK_SECRET}"
    assert "s3cret-value" not in repr(table)


@pytest.mark.parametrize("reference, env, fragment", [
    ("${env:MISSING_ONE}", {}, "environment variable MISSING_ONE is not set"),
    ("${file:nope.txt}", {}, "secret file nope.txt cannot be read"),
    ("${cred:exchange}", {}, "credential exchange: $CREDENTIALS_DIRECTORY is not set"),
    ("${cred:exchange}", {"CREDENTIALS_DIRECTORY": "/nonexistent"}, "credential exchange cannot be read"),
])
def test_missing_secret_names_the_variable(tmp_path, reference, env, fragment):
    errors = load(MINIMAL + f"security:\n  secret: \"{reference}\"\n", tmp_path, env=env)
    assert isinstance(errors, list)
    assert any(fragment in e.message and e.line == 8 for e in errors), messages(errors)


def test_secret_value_never_in_errors(tmp_path):
    # The secret resolves, but the file around it is broken: the errors must not show it.
    text = MINIMAL + "security:\n  secret: ${env:S}\n  max_body_bytes: tiny\n"
    errors = load(text, tmp_path, env={"S": "hunter2-very-secret"})
    assert isinstance(errors, list)
    assert "hunter2-very-secret" not in json.dumps([str(e) for e in errors])


def test_routes_keep_secret_references_as_text(tmp_path):
    text = MINIMAL + "    order: {symbol: 'X', side: buy, type: market, quantity: 1, comment: '${env:S}'}\n"
    table = load(text, tmp_path, env={"S": "leak"})
    assert isinstance(table, RoutingTable)
    assert table.secrets == frozenset()


def test_version_covers_referenced_files(tmp_path):
    schema = tmp_path / "mine.schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    text = MINIMAL + "    schema: mine.schema.json\n"
    first = load(text, tmp_path)
    schema.write_text(json.dumps({"type": "object", "required": ["symbol"]}))
    second = load(text, tmp_path)
    assert first.version != second.version
    assert str(schema.resolve()) in second.files


def test_empty_and_non_mapping_files(tmp_path):
    assert "empty" in load("", tmp_path)[0].message
    assert "mapping" in load("- 1\n- 2\n", tmp_path)[0].message


def test_unreadable_file_is_one_error(tmp_path):
    errors = config.load_file(tmp_path / "absent.yaml")
    assert len(errors) == 1 and "cannot read" in errors[0].message


def test_durations():
    assert config.parse_duration("60s").total_seconds() == 60
    assert config.parse_duration("1.5m").total_seconds() == 90
    assert config.parse_duration("250ms").total_seconds() == 0.25
    assert config.parse_duration(5).total_seconds() == 5
    with pytest.raises(ValueError):
        config.parse_duration("soon")


def test_tradingview_preset(tmp_path):
    table = load(MINIMAL + "security: {allow_ips: [tradingview, 10.0.0.0/8]}\n", tmp_path)
    assert [str(n) for n in table.security.allow_ips] == [
        "52.89.214.238/32", "34.212.75.30/32", "54.218.53.128/32", "52.32.178.7/32", "10.0.0.0/8"]


def test_relative_paths_start_beside_the_link_not_its_target(tmp_path):
    # Kubernetes-style `..data` swaps: routes.yaml is a link into a directory that changes.
    data = tmp_path / "..2026_01"
    data.mkdir()
    (data / "routes.yaml").write_text(MINIMAL + "server: {journal: j.sqlite}\n")
    (tmp_path / "routes.yaml").symlink_to(data / "routes.yaml")
    table = config.load_file(tmp_path / "routes.yaml", env={})
    assert table.server.journal == tmp_path / "j.sqlite"
