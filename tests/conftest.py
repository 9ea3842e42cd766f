"""Shared fixtures: tiny randomly initialised decoders (Llama, Qwen2, Mistral, Gemma 3) and a word tokenizer.

Real bundled models are only used by tests marked ``integration``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import namm

VOCAB = 128
torch.set_num_threads(2)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace tokenizer over ``<pad> <eos> <unk> w3 .. w127`` (ids 0, 1, 2, 3, ..., 127)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _common(**extra):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=3,
    )
    base.update(extra)
    return base


def tiny_model(kind: str):
    """A tiny random decoder of the given family, on namm's attention, in eval mode."""
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common()))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common()))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(sliding_window=None)))
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(
            **_common(num_hidden_layers=4, head_dim=16, num_key_value_heads=1),
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "sdpa"
    model.eval()
    namm.enable(model)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "mistral", "gemma3"])
def any_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


def random_prompt(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))


def with_cache(model, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``model``'s forward or ``generate``: ``cache=`` where this
    transformers version takes it, ``past_key_values=`` before (so our own calls raise no deprecation warning)."""
    from namm.cache import cache_argument  # noqa: PLC0415

    return {cache_argument(model): cache}


def prefill_in_chunks(model, tokenizer, policy, prompt: str, delay: int):
    """Run ``prompt`` through ``model`` into a :class:`namm.MemoryCache` of ``policy``, ``delay`` tokens per forward
    call (a memory step after each full chunk); returns the cache."""
    import namm  # noqa: PLC0415

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = namm.MemoryCache(model, policy, delay=delay)
    with torch.no_grad():
        for s in range(0, ids.shape[1], delay):
            model(ids[:, s : s + delay], **with_cache(model, cache))
    return cache


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory no file can be written into: a read-only folder, or (as root, who ignores modes) /sys."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/sys"), Path("/proc")):
        try:
            (candidate / ".namm-probe").write_text("")
        except OSError:
            return candidate
        (candidate / ".namm-probe").unlink()
    pytest.fail("no unwritable directory on this machine to test with")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (integration tests only)."""
    return namm.load_model("smollm2-135m")
