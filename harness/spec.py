"""What one run is: the bit setting (`BitSpec`) and the frozen, validated run description (`RunSpec`).

`RunSpec.run_key` hashes every field that changes a number (model, method and its params, bits, seed,
calibration and evaluation protocol, budget cuts) and nothing that does not (tracking URI, output paths,
`force`). Code changes are not in the key: re-running a sweep after a code change needs `force=true`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

BITS_GRAMMAR = (
    "w{W}[g{G}]a{A}kv{K} with W in {1, 1.58, 2, 3, 4, 5, 6, 8, 16}, A and K integers in 2..16 "
    "(16 = not quantized), G a positive group size; e.g. w2a4kv4, w4g128a16kv16, w1.58a16kv16"
)
WEIGHT_BITS = (1.0, 1.58, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 16.0)
_BITS_RE = re.compile(r"^w(\d+(?:\.\d+)?)(?:g(\d+))?a(\d+)kv(\d+)$")


class SpecError(ValueError):
    """A run description that cannot be run; the message is one line and names the fix."""


@dataclass(frozen=True)
class BitSpec:
    """Weight, activation and KV-cache bit widths plus the weight group size (None = per channel)."""

    w: float
    a: int
    kv: int
    group: int | None = None

    @classmethod
    def parse(cls, text: str) -> BitSpec:
        match = _BITS_RE.match(str(text).strip().lower())
        if not match:
            raise SpecError(f"malformed bits {text!r}: expected {BITS_GRAMMAR}")
        w = float(match.group(1))
        group = int(match.group(2)) if match.group(2) else None
        a, kv = int(match.group(3)), int(match.group(4))
        if w not in WEIGHT_BITS:
            raise SpecError(f"bits {text!r}: weight bits {match.group(1)} not allowed; expected {BITS_GRAMMAR}")
        if not (2 <= a <= 16 and 2 <= kv <= 16):
            raise SpecError(f"bits {text!r}: activation/KV bits out of range; expected {BITS_GRAMMAR}")
        if group is not None and (group <= 0 or w == 16):
            raise SpecError(f"bits {text!r}: a group size needs W < 16 and G > 0; expected {BITS_GRAMMAR}")
        return cls(w=w, a=a, kv=kv, group=group)

    def __str__(self) -> str:
        w = f"{self.w:g}"
        g = f"g{self.group}" if self.group else ""
        return f"w{w}{g}a{self.a}kv{self.kv}"

    @property
    def quantizes_weights(self) -> bool:
        return self.w < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.a < 16

    @property
    def quantizes_kv(self) -> bool:
        return self.kv < 16

    @property
    def is_full_precision(self) -> bool:
        return not (self.quantizes_weights or self.quantizes_activations or self.quantizes_kv)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: `name` is a registered model or `hf` (then `id` is a hub id or local path)."""

    name: str
    id: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seed: int = 0  # only random-init models (tiny-llama) use it


@dataclass(frozen=True)
class CalibSpec:
    """Calibration: `nsamples` random windows of `seqlen` tokens from `dataset` (see harness.data)."""

    dataset: str = "wikitext2-valid"
    nsamples: int = 128
    seqlen: int = 2048


@dataclass(frozen=True)
class PerplexitySpec:
    """The PPL protocol (DESIGN.md): rows joined with blank lines, non-overlapping `seqlen` windows."""

    dataset: str = "wikitext2"
    seqlen: int = 2048
    max_windows: int | None = None  # budget cut; None = the whole split
    batch_size: int = 1
    dtype: str = "float32"


@dataclass(frozen=True)
class ZeroShotSpec:
    """lm-eval tasks scored zero-shot; `limit` = documents per task (None = whole split)."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class LatencySpec:
    """Per-run kernel latency settings (harness/evaluate/latency.py); measurements, so not in the run key."""

    enabled: bool = True
    reps: int = 5
    tokens: tuple[int, ...] = (1, 2048)
    device: str = "cpu"


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
    # Not part of the key:
    data_dir: str | None = field(default=None, compare=False)
    latency: LatencySpec = field(default_factory=LatencySpec, compare=False)

    def key_fields(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "method": self.method,
            "method_params": dict(sorted(self.method_params.items())),
            "bits": str(self.bits),
            "calib": asdict(self.calib),
            "ppl": asdict(self.ppl),
            "seed": self.seed,
            **(
                {"zeroshot": {"tasks": list(self.zeroshot.tasks), "limit": self.zeroshot.limit}}
                if self.zeroshot.tasks
                else {}
            ),
        }

    @property
    def run_key(self) -> str:
        blob = json.dumps(self.key_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
