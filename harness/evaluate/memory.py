"""Honest memory accounting: bits per weight, model bytes as deployed, KV-cache bytes, peak RSS.

* Quantized decoder linears are counted by their format object (`methods.core.formats`): `storage_bits()`
  is every stored bit — codes, fp16 scales, zeros, level tables/codebooks, signs — and a weight whose class
  is not a known format is an error (never a silent miscount).
* `packed_bits_per_weight` counts the bytes of the deployed packed layout (`format.pack().nbytes()`): e.g.
  int codes in int32 words (int3 packs 10 per word = 3.2 bits per code, and each row pads to whole words),
  ternary 5 trits per byte, binary 32 signs per word. Logged only when every quantized linear packs.
* Every other parameter (embeddings, lm_head, norms, any linear left unquantized) is counted at 16 bits:
  that is how the model is deployed. Tied embeddings are counted once (shared storage); a method that
  unties them (rotations) pays for both.
* KV cache per token: what the run's KV quantizer plug-in reports (`bytes_per_token`: its own format — codes,
  scales, zeros, outliers); 2 bytes per element when the cache stays 16-bit.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import psutil
from torch import nn

from methods.core.arch import decoder_linears
from methods.core.attention import uniform_kv_bytes_per_token
from methods.core.formats import check_format
from methods.core.qlinear import QLinear
from qkernels.packing import packed_nbytes


@dataclass(frozen=True)
class MemoryReport:
    quantized_weights: int
    quantized_bits_per_weight: float  # over the quantized decoder linears
    model_bits_per_weight: float  # over every stored parameter, 16-bit layers included
    model_bytes: int
    sixteen_bit_params: int
    sixteen_bit_layers: str
    kv_bytes_per_token: float
    packed_bits_per_weight: float | None = None  # deployed packed layout; None if some format has none

    def metrics(self) -> dict[str, float]:
        packed = {} if self.packed_bits_per_weight is None else {"packed_bits_per_weight": self.packed_bits_per_weight}
        return {
            **packed,
            "bits_per_weight": self.quantized_bits_per_weight,
            "model_bits_per_weight": self.model_bits_per_weight,
            "model_mb": self.model_bytes / 2**20,
            "sixteen_bit_params": float(self.sixteen_bit_params),
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }


def _unique_parameters(module: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    seen: dict[int, tuple[str, nn.Parameter]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        seen.setdefault(id(param), (name, param))
    return seen


def memory_report(model: nn.Module, kv_bytes_per_token: float | None = None) -> MemoryReport:
    """`kv_bytes_per_token`: from the KV quantizer plug-in; None = a 16-bit cache."""
    linear_bits, linear_weights, linear_param_ids = 0, 0, set()
    packed_bits: int | None = 0
    for _, _, _, module in decoder_linears(model):
        if isinstance(module, QLinear):
            linear_param_ids.add(id(module.weight))
            linear_bits += module.storage_bits()
            linear_weights += module.weight.numel()
            packed_bits = _add_packed_bits(packed_bits, module)
    other_params, other_names = 0, set()
    for name, param in _unique_parameters(model).values():
        if id(param) in linear_param_ids:
            continue
        other_params += param.numel()
        if "norm" not in name and "layers." not in name:
            other_names.add(name.rsplit(".", 1)[0])
    total_bits = linear_bits + 16 * other_params
    total_weights = linear_weights + other_params
    return MemoryReport(
        quantized_weights=linear_weights,
        quantized_bits_per_weight=(linear_bits / linear_weights) if linear_weights else 16.0,
        model_bits_per_weight=total_bits / total_weights,
        model_bytes=total_bits // 8,
        sixteen_bit_params=other_params,
        sixteen_bit_layers=", ".join(sorted(other_names))
        + ", norms"
        + ("" if linear_weights else ", all decoder linears"),
        kv_bytes_per_token=(
            uniform_kv_bytes_per_token(model, 16, True, None) if kv_bytes_per_token is None else kv_bytes_per_token
        ),
        packed_bits_per_weight=(packed_bits / linear_weights) if linear_weights and packed_bits else None,
    )


def packed_bits_per_weight(shapes: Counter, bits: int, group: int | None, sym: bool) -> float:
    """Packed bits per weight of decoder blocks whose linears have `shapes` ((out, in) -> count per block),
    quantized at `bits` with `group` (None = per channel): the deployed bytes depend on shapes and format
    only (used to account runs logged before `packed_bits_per_weight` existed)."""
    total_bits = sum(
        count * 8 * packed_nbytes(out_f, in_f, -(-in_f // (group or in_f)), bits, sym)
        for (out_f, in_f), count in shapes.items()
    )
    return total_bits / sum(count * out_f * in_f for (out_f, in_f), count in shapes.items())


def _add_packed_bits(total: int | None, module: QLinear) -> int | None:
    if total is None or module.qweight is None:
        return None
    packed = check_format(module.qweight).pack()
    return None if packed is None else total + 8 * packed.nbytes()


class PeakRSS:
    """Samples this process's resident set size in a background thread; `peak_mb` after the block."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process(os.getpid())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
