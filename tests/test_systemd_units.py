"""The shipped systemd units: `systemd-analyze verify` passes, the hardening is all there, and it holds."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "systemd"
SERVICE = UNITS / "fksroute.service"
SOCKET = UNITS / "fksroute.socket"
README = ROOT / "README.md"
INSTALLED_BINARY = "/opt/fksroute/bin/fksroute"  # where the README's systemd installation puts the console script

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install -y systemd)")


def directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [every value, in order]}}; keys may repeat in systemd units."""
    units: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        units[section][key.strip()].append(value.strip())
    return units


def service_setting(key: str) -> str:
    """The last value of a [Service] key, as systemd reads it."""
    return directives(SERVICE)["Service"][key][-1]


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists, so the copies point at a binary that does;
    # everything else is the shipped text.
    binary = Path(sys.executable).with_name("fksroute")
    stand_in = str(binary) if binary.exists() else shutil.which("true")
    for unit in (SERVICE, SOCKET):
        text = unit.read_text()
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_BINARY, str(stand_in)))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
        capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings with exit 0, so any output is a failure too.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_commands_use_the_documented_install_path() -> None:
    assert service_setting("ExecStart") == f"{INSTALLED_BINARY} serve"
    assert service_setting("ExecReload") == f"{INSTALLED_BINARY} reload"
    assert INSTALLED_BINARY in README.read_text()


@pytest.mark.parametrize(("key", "value"), [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("WatchdogSec", "30"),
    ("Restart", "on-failure"),
    ("Environment", "FKSROUTE_CONFIG=/etc/fksroute/routes.yaml"),
    ("DynamicUser", "yes"),
    ("StateDirectory", "fksroute"),
    ("ConfigurationDirectory", "fksroute"),
    ("UMask", "0077"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("DevicePolicy", "closed"),
    ("PrivateUsers", "yes"),
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RemoveIPC", "yes"),
    ("KeyringMode", "private"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallErrorNumber", "EPERM"),
])
def test_hardening_directive(key: str, value: str) -> None:
    assert value in directives(SERVICE)["Service"][key]


def test_system_calls_are_filtered_to_a_service_set() -> None:
    assert directives(SERVICE)["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_secrets_come_as_credentials_never_as_environment() -> None:
    service = directives(SERVICE)["Service"]
    loaded = dict(entry.split(":", 1) for entry in service["LoadCredential"])
    assert loaded == {name: f"/etc/fksroute/credentials/{name}"
                      for name in ("fksroute-secret", "binance-key", "binance-secret")}
    # The example layout holds a file for every credential the unit loads.
    assert all((UNITS / "credentials.example" / name).is_file() for name in loaded)
    assert not any(re.search(r"SECRET|KEY|TOKEN", env) for env in service["Environment"])


def test_socket_takes_port_443_and_the_loopback_admin_port() -> None:
    socket_unit = directives(SOCKET)
    assert socket_unit["Socket"]["ListenStream"] == ["443", "127.0.0.1:4700"]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]


@needs_analyze
def test_security_score_matches_the_readme() -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(SERVICE)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for fksroute\.service: (\d+\.\d)", done.stdout)
    assert found, done.stdout + done.stderr
    score = found.group(1)
    readme = README.read_text()
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout.split()[1]
    # Other systemd versions weigh other checks; the README gives the score of the version it names.
    if f"(systemd {version}," not in readme:
        pytest.skip(f"README.md gives the score of another systemd version than {version} ({score} here)")
    # Only network access is left: PrivateNetwork= and an IP allow list cannot be had by an order router.
    assert float(score) <= 1.1
    assert f"exposure level for fksroute.service: {score}" in readme


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

MDWE_WORKLOAD = """
import asyncio, ctypes, hashlib, mmap, ssl, sqlite3
try:  # proves the switch is on: writable and executable memory is refused
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W^X not enforced")
except PermissionError:
    pass
import ccxt.async_support, httptools, jinja2.sandbox, jsonschema, orjson, starlette.applications, uvicorn, uvloop
assert jinja2.sandbox.SandboxedEnvironment().from_string("{{ 6 * 7 }}").render() == "42"
ssl.create_default_context()
sqlite3.connect(":memory:").execute("select 1")
ccxt.async_support.binance()
uvloop.run(asyncio.sleep(0))
print("ok")
"""


def _refuse_writable_executable_memory() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def test_the_python_stack_runs_without_writable_executable_memory() -> None:
    # The kernel's own W^X switch (Linux 6.3+) stands in for MemoryDenyWriteExecute=yes.
    try:
        done = subprocess.run([sys.executable, "-c", MDWE_WORKLOAD], capture_output=True, text=True,
                              timeout=60, preexec_fn=_refuse_writable_executable_memory)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {exc}")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
