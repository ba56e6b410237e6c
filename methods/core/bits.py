"""The bit-setting grammar (`BitSpec`) and the error for a run description that cannot run.

Lives below the harness so methods, plug-ins and kernels can use it without importing `harness`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


INTEGER_WEIGHT_BITS = (2, 3, 4, 5, 6, 8, 16)


def check_integer_weight_bits(bits: BitSpec, method: str, error: type[Exception]) -> None:
    """Uniform-grid methods run integer weight widths 2..8 (or 16); 1 and 1.58 bit need ternary/binary grids."""
    if bits.w not in INTEGER_WEIGHT_BITS:
        raise error(
            f"{method} does not support {bits}: weight bits must be one of "
            f"{', '.join(str(b) for b in INTEGER_WEIGHT_BITS)} (1 and 1.58 bit need a ternary/binary method)"
        )
