"""The method registry: one line per method. A method is a config dataclass, `supports(request)` raising
`UnsupportedBits` before any model loads, and `quantize(model, config, bits, ctx) -> QuantSummary`
(see `methods.base`). Activation and KV-cache quantizers are plug-ins: `methods.act`, `methods.kv`."""

from __future__ import annotations

from methods import (
    awq,
    bcq,
    bitdistiller,
    gptq,
    gptq_llmc,
    hqq,
    omniquant,
    paretoq,
    quarot,
    quip,
    quip_sharp,
    rcp,
    rsavq,
    rtn,
    signround,
    smoothquant,
    spinquant,
)
from methods.base import MethodEntry

METHODS: dict[str, MethodEntry] = {
    "rtn": MethodEntry(rtn.RTNConfig, supports=rtn.supports, quantize=rtn.quantize),
    "gptq": MethodEntry(gptq.GPTQConfig, supports=gptq.supports, quantize=gptq.quantize),
    "quarot": MethodEntry(quarot.QuaRotConfig, supports=quarot.supports, quantize=quarot.quantize),
    "signround": MethodEntry(signround.SignRoundConfig, supports=signround.supports, quantize=signround.quantize),
    "paretoq": MethodEntry(
        paretoq.ParetoQConfig, supports=paretoq.supports, quantize=paretoq.quantize, trains=True, family="qat"
    ),
    "spinquant": MethodEntry(
        spinquant.SpinQuantConfig, supports=spinquant.supports, quantize=spinquant.quantize, trains=True
    ),
    "quip": MethodEntry(quip.QuIPConfig, supports=quip.supports, quantize=quip.quantize),
    "rsavq": MethodEntry(rsavq.RSAVQConfig, supports=rsavq.supports, quantize=rsavq.quantize),
    "quipsharp": MethodEntry(quip_sharp.QuIPSharpConfig, supports=quip_sharp.supports, quantize=quip_sharp.quantize),
    "bcq": MethodEntry(bcq.BCQConfig, supports=bcq.supports, quantize=bcq.quantize),
    "bitdistiller": MethodEntry(
        bitdistiller.BitDistillerConfig,
        supports=bitdistiller.supports,
        quantize=bitdistiller.quantize,
        trains=True,
        family="qat",
    ),
    "r2q": MethodEntry(
        bitdistiller.R2QConfig,
        supports=bitdistiller.supports_r2q,
        quantize=bitdistiller.quantize,
        trains=True,
        family="qat",
    ),
    "hqq": MethodEntry(hqq.HQQConfig, supports=hqq.supports, quantize=hqq.quantize, requires=hqq.LIBRARY),
    "awq": MethodEntry(
        awq.AWQConfig, supports=awq.supports, quantize=awq.quantize, requires=awq.LIBRARY, environment="llmc"
    ),
    "gptq_llmc": MethodEntry(
        gptq_llmc.GPTQLLMCConfig,
        supports=gptq_llmc.supports,
        quantize=gptq_llmc.quantize,
        requires=gptq_llmc.LIBRARY,
        environment="llmc",
    ),
    "smoothquant": MethodEntry(
        smoothquant.SmoothQuantConfig,
        supports=smoothquant.supports,
        quantize=smoothquant.quantize,
        requires=smoothquant.LIBRARY,
        environment="llmc",
    ),
    "omniquant": MethodEntry(omniquant.OmniQuantConfig, supports=omniquant.supports, quantize=omniquant.quantize),
    "rcp": MethodEntry(rcp.RCPConfig, supports=rcp.supports, quantize=rcp.quantize, trains=True, family="qat"),
}
