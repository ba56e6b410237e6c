"""KV-cache quantizer plug-ins (`kv=` on the command line): one line per plug-in."""

from __future__ import annotations

from methods.base import PluginEntry
from methods.kv import akvq, kvquant, rtn

KV_QUANTIZERS: dict[str, PluginEntry] = {
    "rtn": PluginEntry(rtn.RTNKVConfig, build=rtn.build),
    "kvquant": PluginEntry(kvquant.KVQuantConfig, build=kvquant.build),
    "akvq": PluginEntry(akvq.AKVQConfig, build=akvq.build),
}
