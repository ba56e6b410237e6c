"""What one run is: the bit setting (`BitSpec`) and the frozen, validated run description (`RunSpec`).

`RunSpec.run_key` hashes every field that changes a number (model, method and its params, the act/KV plug-ins
and their params when the bits use them, bits, seed, calibration and evaluation protocol, budget cuts) and
nothing that does not (tracking URI, output paths, `force`). Code changes are not in the key: re-running a sweep
after a code change needs `force=true`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from methods.core.bits import BITS_GRAMMAR, BitSpec, SpecError  # noqa: F401  (re-exported)
from methods.core.params import flag, valid

DTYPES = ("float32", "bfloat16", "float16")  # harness.models maps them to torch dtypes


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: `name` is a registered model or `hf` (then `id` is a hub id or local path)."""

    name: str
    id: str | None = None
    dtype: str = valid("float32", choices=DTYPES)
    device: str = "cpu"
    trust_remote_code: bool = flag(False)
    seed: int = valid(0, ge=0)  # only random-init models (tiny-llama) use it


@dataclass(frozen=True)
class CalibSpec:
    """Calibration: `nsamples` random windows of `seqlen` tokens from `dataset` (see harness.data)."""

    dataset: str = "wikitext2-valid"
    nsamples: int = valid(128, ge=1)
    seqlen: int = valid(2048, ge=2)


@dataclass(frozen=True)
class TrainSpec:
    """Training data for methods that train (QAT): `windows` seeded windows of `seqlen` tokens from `dataset` —
    a calibration corpus, never the evaluation's test split."""

    dataset: str = "wikitext2-valid"
    windows: int = valid(64, ge=1)
    seqlen: int = valid(512, ge=2)


@dataclass(frozen=True)
class PerplexitySpec:
    """The PPL protocol (DESIGN.md): rows joined with blank lines, non-overlapping `seqlen` windows."""

    dataset: str = "wikitext2"
    seqlen: int = valid(2048, ge=2)
    max_windows: int | None = valid(None, ge=1, none=True)  # budget cut; None = the whole split
    batch_size: int = valid(1, ge=1)
    dtype: str = valid("float32", choices=DTYPES)


@dataclass(frozen=True)
class ZeroShotSpec:
    """lm-eval tasks scored zero-shot: `limit` = the first documents of each task, or `sample` = a seeded random
    subset of that many documents (`sample_seed`; the whole split where smaller), the same documents for every
    run so two runs can be compared document by document; neither = whole splits."""

    tasks: tuple[str, ...] = ()
    limit: int | None = valid(None, ge=1, none=True)
    batch_size: int = valid(8, ge=1)
    sample: int | None = valid(None, ge=1, none=True)
    sample_seed: int = valid(0, ge=0)


@dataclass(frozen=True)
class LatencySpec:
    """Per-run kernel latency settings (harness/evaluate/latency.py); measurements, so not in the run key."""

    enabled: bool = flag(True)
    reps: int = valid(5, ge=1)
    tokens: tuple[int, ...] = (1, 2048)
    device: str = "cpu"


@dataclass(frozen=True)
class DeploySpec:
    """Deployed mode (harness/evaluate/deploy.py): packed kernels, the check — every deployed linear within
    `linear_ulps` bf16 ulps of its fake-quant linear on the same input (gates formats that quantize activations),
    PPL on the first `windows` windows within relative `tolerance` of the fake-quant model in the same dtype (gates
    weight-only formats) — and generation speed at batch 1. Measurements and a check, so not in the run key."""

    enabled: bool = flag(False)
    windows: int = valid(2, ge=1)
    tolerance: float = valid(0.001, gt=0)
    linear_ulps: float = valid(1.0, ge=0)
    prompt_tokens: int = valid(128, ge=1)
    new_tokens: int = valid(32, ge=1)
    reps: int = valid(3, ge=1)


@dataclass(frozen=True)
class PluginSpec:
    """An act/KV quantizer plug-in: its registry name and parameters."""

    name: str = "rtn"
    params: dict[str, Any] = field(default_factory=dict)


# Before the act/KV plug-ins, the RTN quantizer settings were method parameters under these names. A run whose
# plug-ins are exactly those (rtn, with no setting the old ones lacked) keeps its old run key, so sweeps resume
# over runs recorded before the change instead of redoing them.
_LEGACY_ACT = {"a_sym": "sym", "a_clip_ratio": "clip_ratio"}
_LEGACY_KV = {"kv_sym": "sym", "kv_clip_ratio": "clip_ratio", "kv_group_size": "group_size"}
LEGACY_PLUGIN_PARAMS = {"act": tuple(_LEGACY_ACT), "kv": tuple(_LEGACY_KV)}


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    method: str
    method_params: dict[str, Any]
    bits: BitSpec
    calib: CalibSpec
    ppl: PerplexitySpec
    zeroshot: ZeroShotSpec = ZeroShotSpec()
    seed: int = 0
    budget: str = "full"
    act: PluginSpec = PluginSpec()
    kv: PluginSpec = PluginSpec()
    train: TrainSpec | None = None  # set only for methods that train
    # Not part of the key:
    data_dir: str | None = field(default=None, compare=False)
    latency: LatencySpec = field(default_factory=LatencySpec, compare=False)
    deploy: DeploySpec = field(default_factory=DeploySpec, compare=False)
    compile_quantizers: bool = field(default=False, compare=False)  # bit-identical; speed only
    fidelity: bool = field(default=False, compare=False)  # KL / top-1 vs FP in the PPL pass; a measurement
    cpu_gemm: str = field(default="mkl", compare=False)  # fp32 CPU matmuls (methods/core/cpu_gemm.py); mkl =
    # PyTorch's own; runs take `cpu_gemm` from the config (onednn by default)

    def _legacy_plugins(self) -> dict[str, Any] | None:
        """The plug-ins as pre-plug-in method parameters, or None if they cannot be written that way."""
        act, kv = self.act, self.kv
        if act.name != "rtn" or kv.name != "rtn" or act.params.get("group_size") or kv.params.get("keys_pre_rope"):
            return None
        legacy = {old: act.params.get(new) for old, new in _LEGACY_ACT.items()}
        return legacy | {old: kv.params.get(new) for old, new in _LEGACY_KV.items()}

    def _keyed_method_params(self) -> dict[str, Any]:
        """The method's parameters, less those added after runs were recorded while they hold the value those
        runs implicitly had (`methods.core.params.added_later`): old records keep their keys. A later parameter
        that has no effect in this run (its `only_if` flag is off) is left out too."""
        from methods import METHODS
        from methods.core.params import inert, key_neutral

        entry = METHODS.get(self.method)
        neutral = key_neutral(entry.config_cls) if entry is not None else {}
        skip = inert(entry.config_cls, {k: str(v) for k, v in self.method_params.items()}) if entry else set()
        return {k: v for k, v in self.method_params.items() if not (k in neutral and (v == neutral[k] or k in skip))}

    def key_fields(self) -> dict[str, Any]:
        legacy = self._legacy_plugins()
        plugins = {}
        if legacy is None:  # only the plug-ins the bits use change numbers
            if self.bits.quantizes_activations:
                plugins["act"] = asdict(self.act)
            if self.bits.quantizes_kv:
                plugins["kv"] = asdict(self.kv)
        return {
            "model": asdict(self.model),
            "method": self.method,
            "method_params": dict(sorted({**self._keyed_method_params(), **(legacy or {})}.items())),
            **plugins,
            "bits": str(self.bits),
            "calib": asdict(self.calib),
            "ppl": asdict(self.ppl),
            "seed": self.seed,
            **({"train": asdict(self.train)} if self.train is not None else {}),
            **(
                {"zeroshot": {"tasks": list(self.zeroshot.tasks), "limit": self.zeroshot.limit, **self._zs_sample()}}
                if self.zeroshot.tasks
                else {}
            ),
        }

    def _zs_sample(self) -> dict:
        """The seeded document subset, in the key only when asked for (keys of earlier runs stay as they were)."""
        if self.zeroshot.sample is None:
            return {}
        return {"sample": self.zeroshot.sample, "sample_seed": self.zeroshot.sample_seed}

    @property
    def run_key(self) -> str:
        blob = json.dumps(self.key_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def method_label(spec: RunSpec) -> str:
    """`gptq`, or `gptq + kv=kvquant` when a non-default plug-in is in use."""
    used = [(g, p.name) for g, p, b in (("act", spec.act, spec.bits.a), ("kv", spec.kv, spec.bits.kv)) if b < 16]
    return " + ".join([spec.method] + [f"{group}={name}" for group, name in used if name != "rtn"])


def run_name(spec: RunSpec) -> str:
    return f"{spec.model.id or spec.model.name}/{method_label(spec)}/{spec.bits}"


def ui_run_name(spec: RunSpec) -> str:
    """The MLflow run name, short enough for the runs table: `method · bits` (model and protocol are tags)."""
    return f"{method_label(spec)} · {spec.bits}"
