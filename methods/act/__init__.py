"""Activation-quantizer plug-ins (`act=` on the command line): one line per plug-in."""

from __future__ import annotations

from methods.act import bcq, rtn
from methods.base import PluginEntry

ACT_QUANTIZERS: dict[str, PluginEntry] = {
    "rtn": PluginEntry(rtn.RTNActConfig, build=rtn.build),
    "bcq": PluginEntry(bcq.BCQActConfig, build=bcq.build),
}
