"""The `fksroute agent ninjatrader|mt5` and `fksroute certs` commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from fksroute import __version__

log = logging.getLogger("fksroute.agent")

DEFAULT_LISTEN = "127.0.0.1:18861"
DEFAULT_OIF_DIR = Path.home() / "Documents" / "NinjaTrader 8" / "incoming"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or :PORT (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, not {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def default_log_file(backend: str) -> Path:
    """%LOCALAPPDATA%\\fksroute\\agent-BACKEND.log on Windows, ~/.fksroute/agent-BACKEND.log elsewhere."""
    base = os.environ.get("LOCALAPPDATA")
    return (Path(base) / "fksroute" if base else Path.home() / ".fksroute") / f"agent-{backend}.log"


def setup_logging(log_file: Path, level: str) -> None:
    """Log to the console and to a rotating file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger("fksroute")
    root.setLevel(level)
    for handler in (logging.StreamHandler(sys.stderr),
                    logging.handlers.RotatingFileHandler(log_file, maxBytes=5_000_000, backupCount=5,
                                                         encoding="utf-8")):
        handler.setFormatter(formatter)
        root.addHandler(handler)


def password_source(env_name: str | None, file: Path | None) -> Callable[[], str | None]:
    """A function that reads the MT5 password when needed, from an environment variable or a file; checked now."""
    if env_name and file:
        raise ValueError("give --password-env or --password-file, not both")
    if env_name:
        if not os.environ.get(env_name):
            raise ValueError(f"--password-env: the environment variable {env_name} is not set")
        return lambda: os.environ.get(env_name)
    if file:
        if not file.is_file():
            raise ValueError(f"--password-file: {file} is not a readable file")
        return lambda: file.read_text(encoding="utf-8").strip("\r\n")
    return lambda: None


def make_backend(args: argparse.Namespace) -> Any:
    """The backend the command line names; MetaTrader5 is imported only here, when the mt5 agent starts."""
    if args.backend == "ninjatrader":
        from fksroute.agents.ninjatrader import NinjaTraderBackend
        return NinjaTraderBackend(args.oif_dir, args.outgoing_dir)
    from fksroute.agents.mt5 import Mt5Backend
    try:
        mt5 = importlib.import_module("MetaTrader5")
    except ImportError:
        raise ValueError("the MetaTrader5 package is missing: pip install fksroute[mt5] (Windows only)") from None
    return Mt5Backend(mt5, path=args.path, login=args.login, server=args.server,
                      password=password_source(args.password_env, args.password_file),
                      magic=args.magic, deviation=args.deviation)


def run_agent(args: argparse.Namespace) -> int:
    """Serve the agent until interrupted; 2 when it cannot start."""
    from fksroute.agents.service import AgentService, build_server

    setup_logging(args.log_file or default_log_file(args.backend), args.log_level)
    host, port = args.listen
    try:
        backend = make_backend(args)
        server = build_server(AgentService(backend), host=host, port=port, cert=args.cert, key=args.key,
                              ca=args.ca, allowed_cns=args.allow_cn or ())
    except (ValueError, OSError) as exc:
        log.error("the agent cannot start: %s", exc)
        return 2

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # rpyc's server loop closes itself on KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    state = backend.health()
    if not state.get("healthy"):
        # Served anyway: the terminal may come up later, and the daemon's health shows the same message.
        log.warning("%s is not ready: %s", args.backend, state.get("error"))
    allowed = f", client CN in {sorted(args.allow_cn)}" if args.allow_cn else ""
    log.info("fksroute %s agent %s listening on %s:%d (client certificates signed by %s%s)",
             __version__, args.backend, host, server.port, args.ca, allowed)
    try:
        server.start()
    finally:
        backend.close()
    return 0


def run_certs(args: argparse.Namespace) -> int:
    """Create the CA and certificates in DIR and say where each file goes."""
    from fksroute.certs import FILES, write_certificates

    try:
        paths = write_certificates(args.dir, args.host or (), days=args.days, overwrite=args.force)
    except FileExistsError as exc:
        print(f"fksroute certs: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{path}  ->  {FILES[name]}")
    return 0


def _agent_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN), metavar="HOST:PORT",
                        help=f"address to listen on (default {DEFAULT_LISTEN}; 0.0.0.0:18861 for the network)")
    parser.add_argument("--cert", type=Path, required=True, help="the agent's certificate (agent.pem)")
    parser.add_argument("--key", type=Path, required=True, help="the agent's private key (agent.key)")
    parser.add_argument("--ca", type=Path, required=True,
                        help="CA whose client certificates are accepted (ca.pem); a client without one is refused")
    parser.add_argument("--allow-cn", action="append", metavar="NAME",
                        help="accept only client certificates with this common name (repeatable)")
    parser.add_argument("--log-file", type=Path, metavar="PATH",
                        help="log file (default %%LOCALAPPDATA%%\\fksroute\\agent-BACKEND.log)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run_agent)


def add_commands(subparsers: Any) -> None:
    """Add `agent ninjatrader|mt5` and `certs DIR` to the fksroute command line."""
    agent = subparsers.add_parser("agent", help="the Windows agent for NinjaTrader 8 or MetaTrader 5 (rpyc, mutual TLS)")
    backends = agent.add_subparsers(dest="backend", required=True, metavar="ninjatrader|mt5")

    nt = backends.add_parser("ninjatrader", help="write NinjaTrader 8 order instruction files")
    _agent_options(nt)
    nt.add_argument("--oif-dir", type=Path, default=DEFAULT_OIF_DIR,
                    help=f"NinjaTrader's incoming folder (default {DEFAULT_OIF_DIR})")
    nt.add_argument("--outgoing-dir", type=Path, help="NinjaTrader's outgoing folder (default: beside --oif-dir)")

    mt = backends.add_parser("mt5", help="place orders through the MetaTrader5 package")
    _agent_options(mt)
    mt.add_argument("--path", help="terminal64.exe of the terminal to attach to (default: the one installed)")
    mt.add_argument("--login", type=int, help="trading account number")
    mt.add_argument("--server", help="trade server name, as in the terminal's login dialog")
    mt.add_argument("--password-env", metavar="NAME", help="environment variable that holds the account password")
    mt.add_argument("--password-file", type=Path, metavar="PATH", help="file that holds the account password")
    mt.add_argument("--magic", type=int, default=0, help="magic number put on every order (default 0)")
    mt.add_argument("--deviation", type=int, default=10, help="allowed slippage of market orders, in points")

    certs = subparsers.add_parser("certs", help="create a CA and certificates for the daemon and its agents")
    certs.add_argument("dir", type=Path, metavar="DIR")
    certs.add_argument("--host", action="append", metavar="NAME|IP",
                       help="a name or address the daemon dials the agent by (repeatable; default localhost, 127.0.0.1)")
    certs.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    certs.add_argument("--force", action="store_true", help="replace certificates already in DIR")
    certs.set_defaults(func=run_certs)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fksroute.agents.main agent ...`: the agent commands alone, without the daemon's."""
    parser = argparse.ArgumentParser(prog="fksroute")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
