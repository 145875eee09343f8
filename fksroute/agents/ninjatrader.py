"""NinjaTrader 8 backend: writes ATI order instruction files into `incoming` and reads order state from `outgoing`."""

from __future__ import annotations

import glob
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fksroute.agents.service import FAILED, FILLED, PLACED, AgentOrder, NotSent, OrderError, order_result

log = logging.getLogger("fksroute.agent.ninjatrader")

FIELD_COUNT = 13
ORDER_TYPES = {"market": "MARKET", "limit": "LIMIT", "stop": "STOPMARKET", "stop_limit": "STOPLIMIT"}
TIMES_IN_FORCE = ("DAY", "GTC")
DEFAULT_TIME_IN_FORCE = "DAY"
# The order id becomes a file name in `outgoing` (after `<ACCOUNT>_` on some builds): no '_', nothing Windows forbids.
SAFE_ORDER_ID = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
FORBIDDEN = re.compile(r"[;\r\n]")
STALE_AFTER = 30.0  # an oif file still waiting after this long means NinjaTrader is not reading `incoming`

_FINAL_FAILURES = {"REJECTED": "rejected by NinjaTrader", "CANCELLED": "cancelled", "CANCELED": "cancelled"}


def _field(value: str, name: str) -> str:
    # A `;` or line break inside a value would add fields or whole commands to the file.
    if FORBIDDEN.search(value):
        raise OrderError(f"{name} must not contain ';' or line breaks")
    return value


def format_price(value: float) -> str:
    """A price with a '.' decimal point and no exponent or trailing zeros, whatever the Windows locale."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text or "0"


def format_quantity(value: float) -> str:
    """NinjaTrader quantities are whole contracts."""
    if value != int(value):
        raise OrderError(f"quantity {value} is not a whole number of contracts")
    return str(int(value))


def oif_line(*fields: str) -> str:
    """One command line of exactly 13 `;`-separated fields."""
    if len(fields) != FIELD_COUNT:
        raise ValueError(f"an OIF line has {FIELD_COUNT} fields, not {len(fields)}")
    return ";".join(fields)


def check_order_id(order_id: str) -> str:
    """The order id as NinjaTrader will use it in a file name, or OrderError."""
    if not SAFE_ORDER_ID.match(order_id):
        raise OrderError("a NinjaTrader order id must be 1-64 characters of A-Z a-z 0-9 . -")
    return order_id


def place_line(order: AgentOrder) -> str:
    """PLACE;ACCOUNT;INSTRUMENT;ACTION;QTY;ORDER TYPE;LIMIT PRICE;STOP PRICE;TIF;OCO ID;ORDER ID;STRATEGY;STRATEGY ID."""
    if not order.account:
        raise OrderError("a NinjaTrader order needs an account (set `account` on the plugin or in the order)")
    if order.stop_loss is not None or order.take_profit is not None:
        raise OrderError("NinjaTrader takes stop loss and take profit from an ATM strategy: set `strategy`, "
                         "not stop_loss/take_profit")
    tif = order.time_in_force or DEFAULT_TIME_IN_FORCE
    if tif not in TIMES_IN_FORCE:
        raise OrderError("NinjaTrader orders take time_in_force DAY or GTC")
    limit = format_price(order.price) if order.type in ("limit", "stop_limit") else ""
    stop = format_price(order.stop_price) if order.type in ("stop", "stop_limit") else ""
    return oif_line("PLACE", _field(order.account, "account"), _field(order.symbol, "symbol"),
                    order.side.upper(), format_quantity(order.quantity), ORDER_TYPES[order.type], limit, stop,
                    tif, "", check_order_id(order.order_id), _field(order.strategy or "", "strategy"), "")


def cancel_line(order_id: str) -> str:
    """CANCEL by order id; never CANCELALLORDERS, which acts on every connected account."""
    return oif_line("CANCEL", "", "", "", "", "", "", "", "", "", check_order_id(order_id), "", "")


def close_position_line(account: str, symbol: str) -> str:
    """CLOSEPOSITION of one instrument on one account; never FLATTENEVERYTHING."""
    return oif_line("CLOSEPOSITION", _field(account, "account"), _field(symbol, "symbol"),
                    "", "", "", "", "", "", "", "", "", "")


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value == int(value) else value


def parse_state(text: str) -> tuple[str, float, float | None] | None:
    """`STATE;FILLED;AVGPRICE` (the last line written wins), or None while the file is incomplete."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    parts = lines[-1].split(";")
    if len(parts) < 3 or not parts[0]:
        return None
    try:
        filled, average = _number(parts[1] or "0"), _number(parts[2] or "0")
    except (ValueError, OverflowError):
        return None
    return parts[0].strip().upper(), filled, (average or None)


def state_result(order_id: str, state: str, filled: float, average: float | None, path: Path) -> dict[str, Any]:
    """The answer for an order whose state file says `state`."""
    detail = {"state": state, "state_file": path.name}
    if state == "FILLED":
        return order_result(order_id, FILLED, filled_quantity=filled, average_price=average,
                            venue_order_id=order_id, **detail)
    if state in _FINAL_FAILURES:
        return order_result(order_id, FAILED, error=_FINAL_FAILURES[state], filled_quantity=filled,
                            average_price=average, venue_order_id=order_id, **detail)
    return order_result(order_id, PLACED, filled_quantity=filled, average_price=average,
                        venue_order_id=order_id, **detail)


class NinjaTraderBackend:
    """Drives NinjaTrader 8 through its Automated Trading Interface folders."""

    name = "ninjatrader"

    def __init__(self, oif_dir: str | Path, outgoing_dir: str | Path | None = None,
                 tmp_dir: str | Path | None = None, stale_after: float = STALE_AFTER) -> None:
        self.incoming = Path(oif_dir)
        self.outgoing = Path(outgoing_dir) if outgoing_dir else self.incoming.parent / "outgoing"
        # Beside `incoming`, so that os.replace stays on one volume and is atomic.
        self.tmp_dir = Path(tmp_dir) if tmp_dir else self.incoming.parent / "fksroute-tmp"
        self.stale_after = stale_after

    def submit(self, line: str) -> Path:
        """Write one command to a temporary file, then move it into `incoming` under a new oif*.txt name."""
        name = f"oif{time.time_ns()}_{uuid.uuid4().hex[:12]}.txt"
        target = self.incoming / name
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            temp = self.tmp_dir / f"{name}.part"
            with open(temp, "wb") as f:
                f.write(line.encode("utf-8") + b"\r\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except OSError as exc:
            raise NotSent(f"cannot write the order file into {self.incoming}: {exc.strerror or exc}") from None
        log.info("wrote %s: %s", name, line)
        return target

    def place(self, order: AgentOrder) -> dict[str, Any]:
        line = place_line(order)
        target = self.submit(line)
        return order_result(order.order_id, PLACED, venue_order_id=order.order_id, state="SUBMITTED",
                            oif_file=target.name)

    def cancel(self, order_id: str) -> dict[str, Any]:
        target = self.submit(cancel_line(order_id))
        return {"order_id": order_id, "status": "requested", "oif_file": target.name}

    def close_position(self, account: str, symbol: str) -> dict[str, Any]:
        target = self.submit(close_position_line(account, symbol))
        return {"account": account, "symbol": symbol, "status": "requested", "oif_file": target.name}

    def _state_files(self, order_id: str) -> list[Path]:
        # `<ORDER ID>.txt`, or `<ACCOUNT>_<ORDER ID>.txt` on some builds; ids hold no '_', so the match is exact.
        exact = self.outgoing / f"{order_id}.txt"
        prefixed = glob.glob(str(self.outgoing / f"*_{glob.escape(order_id)}.txt"))
        return [p for p in [exact, *map(Path, prefixed)] if p.is_file()]

    def _pending(self) -> list[Path]:
        try:
            return sorted(self.incoming.glob("oif*.txt"))
        except OSError:
            return []

    def _pending_file(self, order_id: str) -> Path | None:
        for path in self._pending():
            try:
                fields = path.read_text(encoding="utf-8").strip().split(";")
            except OSError:
                continue  # consumed by NinjaTrader while we looked
            if len(fields) == FIELD_COUNT and fields[0] == "PLACE" and fields[10] == order_id:
                return path
        return None

    def order_status(self, order_id: str) -> dict[str, Any] | None:
        check_order_id(order_id)
        files = self._state_files(order_id)
        if files:
            path = max(files, key=lambda p: p.stat().st_mtime)
            try:
                parsed = parse_state(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                parsed = None
            if parsed is None:
                return order_result(order_id, PLACED, venue_order_id=order_id, state="UNREADABLE",
                                    state_file=path.name)
            return state_result(order_id, *parsed, path)
        pending = self._pending_file(order_id)
        if pending is not None:
            return order_result(order_id, PLACED, venue_order_id=order_id, state="SUBMITTED",
                                oif_file=pending.name)
        return None

    def positions(self, account: str) -> list[dict[str, Any]]:
        suffix = f"_{account}_Position.txt"
        found = []
        for path in sorted(self.outgoing.glob(f"*{glob.escape(suffix)}")):
            try:
                parsed = parse_state(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            if parsed is None:
                continue
            market, _, exchange = path.name[: -len(suffix)].rpartition(" ")
            side, quantity, average = parsed
            found.append({"symbol": market or exchange, "exchange": exchange if market else None,
                          "side": side.lower(), "quantity": quantity, "average_price": average})
        return found

    def health(self) -> dict[str, Any]:
        state: dict[str, Any] = {"incoming": str(self.incoming), "outgoing": str(self.outgoing)}
        if not self.incoming.is_dir():
            return {**state, "healthy": False, "error": f"{self.incoming} is not a folder"}
        now = time.time()
        waiting = []
        for path in self._pending():
            try:
                waiting.append(now - path.stat().st_mtime)
            except OSError:
                continue
        stale = sum(1 for age in waiting if age > self.stale_after)
        state.update(pending_files=len(waiting), outgoing_exists=self.outgoing.is_dir())
        if stale:
            return {**state, "healthy": False,
                    "error": f"{stale} order file(s) waiting in incoming for over {self.stale_after:g}s: "
                             "is NinjaTrader running with the AT Interface enabled?"}
        return {**state, "healthy": True}

    def close(self) -> None:
        pass
