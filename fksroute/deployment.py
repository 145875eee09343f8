"""A routing table together with its running plugins: what a reload builds and swaps."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fksroute.config import thaw
from fksroute.plugins import create_plugin
from fksroute.plugins.base import Plugin, market_symbols
from fksroute.routing import RoutingTable

log = logging.getLogger("fksroute.deployment")
START_TIMEOUT = 10.0
CLOSE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Deployment:
    """The table in force and the plugin instances its routes send to."""

    table: RoutingTable
    plugins: Mapping[str, Plugin]
    generation: int
    loaded_at: float = field(default_factory=time.time)

    def markets(self, plugin: str) -> Any:
        found = self.plugins.get(plugin)
        return market_symbols(found) if found is not None else ()


class PluginStartError(RuntimeError):
    pass


async def deploy(table: RoutingTable, previous: Deployment | None, generation: int) -> Deployment:
    """Start the plugins `table` needs, reusing each of `previous` whose settings did not change."""
    base_dir = Path(table.source).absolute().parent
    plugins: dict[str, Plugin] = {}
    started: list[Plugin] = []
    try:
        for name, spec in table.plugins.items():
            old_spec = previous.table.plugins.get(name) if previous else None
            if previous and old_spec is not None and old_spec.fingerprint == spec.fingerprint:
                plugins[name] = previous.plugins[name]
                continue
            settings = thaw(spec.settings)
            plugin = create_plugin(name, spec.type, settings, base_dir)
            await asyncio.wait_for(plugin.start(), START_TIMEOUT)
            started.append(plugin)
            plugins[name] = plugin
    except Exception as exc:
        for plugin in started:
            await _close(plugin)
        raise PluginStartError(f"plugin {name} did not start: {type(exc).__name__}: {exc}") from None
    return Deployment(table, plugins, generation)


def retired(old: Deployment, new: Deployment | None) -> list[Plugin]:
    """Plugins of `old` that `new` does not use any more."""
    keep = {id(p) for p in new.plugins.values()} if new else set()
    return [p for p in old.plugins.values() if id(p) not in keep]


async def _close(plugin: Plugin) -> None:
    try:
        await asyncio.wait_for(plugin.close(), CLOSE_TIMEOUT)
    except Exception as exc:
        log.warning("plugin %s did not close cleanly: %s", getattr(plugin, "name", "?"), exc)


async def close_plugins(plugins: list[Plugin]) -> None:
    await asyncio.gather(*(_close(p) for p in plugins))
