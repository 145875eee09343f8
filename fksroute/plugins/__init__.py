"""Plugin registry: a plugin type name to the class that implements it, imported on first use."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Mapping

from fksroute.plugins.base import Plugin, PluginContext

# Imported lazily so that ccxt (slow to import) loads only when a ccxt plugin is configured.
PLUGIN_TYPES: dict[str, str] = {
    "paper": "fksroute.plugins.paper:PaperPlugin",
    "ccxt": "fksroute.plugins.ccxt:CcxtPlugin",
    "http": "fksroute.plugins.http:HttpPlugin",
    "ninjatrader": "fksroute.plugins.agent:NinjaTraderPlugin",
    "mt5": "fksroute.plugins.agent:Mt5Plugin",
}


def plugin_class(type_name: str) -> type:
    module_name, _, attr = PLUGIN_TYPES[type_name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create_plugin(name: str, type_name: str, settings: Mapping[str, Any], base_dir: Path) -> Plugin:
    """Build (not start) the plugin `name` of `type_name` from its settings."""
    context = PluginContext(base_dir=base_dir, logger=logging.getLogger(f"fksroute.plugin.{name}"))
    return plugin_class(type_name)(name, settings, context)
