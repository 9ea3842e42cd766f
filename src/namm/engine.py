"""The generation engine: chunked prefill, memory steps on an absolute cadence, greedy or sampled decoding.

``generate(model, tokenizer, prompt, policy)`` prefills the prompt in chunks that end on absolute
multiples of ``chunk_size`` (so that memory steps, every ``delay`` tokens, land exactly on chunk
ends, as in the reference), then decodes one token at a time until ``max_new_tokens`` or EOS. The
policy runs inside the cache (:class:`namm.cache.MemoryCache`), so the same cache also works with
``model.generate(..., cache=cache)`` (``past_key_values=cache`` before transformers renamed it).

Batches of several prompts are left-padded; padding tokens are never attended to, never counted in
budgets and are evicted at the first memory step.

Data flows one way: the engine drives the model, the model's layers call the cache
(:meth:`namm.cache.MemoryCache.update`), the cache runs the policy's memory steps and evicts.

Policies that score tokens by running the model (a :class:`~namm.policies.base.StepRequest` with ``probe``,
e.g. KVzip) get their memory steps from the engine: the cache holds the steps back during forward calls
(:meth:`~namm.cache.MemoryCache.hold_steps`), and when one is due :func:`probe_step` runs the policy's probe
tokens through the cache (:meth:`namm.cache.MemoryCache.probe`), which takes them out again and runs the steps
with the probe's queries. With ``answer=`` the engine also scores a gold answer teacher-forced against the
cache right after the prompt (:class:`AnswerScore`; no decoding needed).

A :class:`PrefillHook` may change the cache between prefill forward calls: ``namm.evolution.population`` uses
it to compute a prompt's prefix once and fan its cache out to one batch row per population member.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from namm.attention import clear_pending
from namm.cache import MemoryCache, cache_argument
from namm.errors import NammError
from namm.policies.base import Policy


@dataclass
class GenerationStats:
    """Statistics of one :func:`generate` call (cache figures are per managed layer and KV head).

    Attributes:
        prompt_tokens: prompt length per row (padding excluded).
        generated_tokens: generated tokens per row (EOS included).
        kept_tokens: ``[layer][head]`` valid tokens at the end, averaged over rows.
        steps: one entry per memory step and layer: ``layer``, ``n_seen``, ``kept`` (``[row][head]``).
        mean_kv_tokens: token-weighted mean over forward calls of the mean tokens per managed head.
        row_mean_kv_tokens: the same per batch row (per population member when a prefix was fanned out).
        peak_kv_tokens: most tokens any managed head held (just before an eviction).
        full_kv_tokens: tokens a full cache would hold at the end (prompt + generated, longest row).
        kv_bytes / mean_kv_bytes / peak_kv_bytes: key-value storage of all layers, padding included.
        padding_fraction: share of managed storage slots that are per-head compaction padding.
        prefill_seconds / decode_seconds / memory_seconds: wall-clock times (memory steps are inside
            prefill and decode).
        probe_seconds: time of the probe forward passes of a policy that requests a probe (KVzip's reconstruction),
            inside prefill and decode; the answer scoring of ``answer=`` is not counted anywhere.
    """

    prompt_tokens: list[int]
    generated_tokens: list[int]
    kept_tokens: list[list[float]]
    steps: list[dict]
    mean_kv_tokens: float
    row_mean_kv_tokens: list[float]
    peak_kv_tokens: int
    full_kv_tokens: int
    kv_bytes: int
    mean_kv_bytes: float
    peak_kv_bytes: int
    padding_fraction: float
    prefill_seconds: float
    decode_seconds: float
    memory_seconds: float
    probe_seconds: float = 0.0  # forward passes of a probing policy's probes (inside prefill/decode)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def cache_fraction(self) -> float:
        """Mean cache size relative to a full cache over the same forward calls."""
        return self.mean_kv_tokens / max(self._mean_full_tokens, 1e-9)

    @property
    def row_cache_fraction(self) -> list[float]:
        """:attr:`cache_fraction` per batch row."""
        return [t / max(self._mean_full_tokens, 1e-9) for t in self.row_mean_kv_tokens]

    _mean_full_tokens: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("_mean_full_tokens")
        out["seconds"] = self.seconds
        out["cache_fraction"] = self.cache_fraction
        out["row_cache_fraction"] = self.row_cache_fraction
        return out


@dataclass
class AnswerScore:
    """Teacher-forced log-likelihood of a gold answer given the (compressed) cache after the prompt.

    Attributes:
        logprob: sum over the answer's tokens of ``log p(token | prompt, earlier answer tokens)`` (nats).
        tokens: number of answer tokens scored.
        margins: per answer token, its logit minus the largest logit of any other token (nats; > 0 where
            greedy decoding picks it): greedy decoding reproduces the answer exactly when every margin is
            positive, which a good mean likelihood does not promise (a lost first token can hide behind
            well-predicted later ones).
    """

    logprob: float
    tokens: int
    margins: tuple[float, ...] = ()

    @property
    def greedy_prefix(self) -> int:
        """How many leading answer tokens greedy decoding would reproduce (teacher-forced argmax)."""
        n = 0
        for m in self.margins:
            if m <= 0:
                break
            n += 1
        return n

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per answer token (nats)."""
        return -self.logprob / max(self.tokens, 1)


@dataclass
class GenerationResult:
    """Output of :func:`generate`. ``text``/``token_ids`` are per row for a batch, plain for one prompt."""

    text: str | list[str]
    token_ids: list[int] | list[list[int]]
    stats: GenerationStats
    logits: torch.Tensor | None = None  # (B, new_tokens, vocab) if return_logits
    answer: AnswerScore | list[AnswerScore] | None = None  # with generate(answer=...): per row for several rows


class PrefillHook(Protocol):
    """An extension point of :func:`generate` between its prefill forward calls.

    The hook may change the cache's batch, from one row to several (``cache.batch_repeat_interleave``); every
    later input is then broadcast to the cache's rows. ``namm.evolution.population.SharedPrefix`` is one.
    """

    def begin(self, cache: MemoryCache, input_ids: torch.Tensor) -> None:
        """Before the first forward call; ``input_ids`` ``(B, N)`` is the whole prompt."""

    def after_forward(self, cache: MemoryCache, end: int) -> None:
        """After the prefill forward call that ended at absolute position ``end``, before the cache is measured."""


class _Meter:
    """Accumulates the cache size after every forward call.

    Per-row sums broadcast: a batch that grew from one row (a prefix computed once, then copied to every row)
    carries the one row's sum into every row.
    """

    def __init__(self, cache: MemoryCache):
        self.cache = cache
        self.tokens = self.full = self.bytes = self.weight = 0.0
        self.row_tokens: torch.Tensor | None = None  # (B,) token-weighted sum of mean tokens per head
        self.peak_tokens = 0

    def record(self, processed: int, n_seen: int) -> None:
        kept = self.cache.kept_tokens().float()  # (L, B, H)
        rows = kept.mean(dim=(0, 2)).cpu() * processed
        self.row_tokens = rows if self.row_tokens is None else rows + self.row_tokens
        self.tokens += kept.mean().item() * processed
        self.full += n_seen * processed
        self.bytes += self.cache.kv_bytes() * processed
        self.weight += processed
        self.peak_tokens = max(self.peak_tokens, int(kept.max()))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return ids


def _encode(tokenizer, prompt) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return ``(input_ids (B, N), attention_mask (B, N), batched)`` with left padding."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
        return ids.long(), torch.ones_like(ids, dtype=torch.long), prompt.dim() == 2
    batched = not isinstance(prompt, str)
    prompts = list(prompt) if batched else [prompt]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise NammError("Empty prompt: pass a non-empty string (or a list of non-empty strings).")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    return enc["input_ids"], enc["attention_mask"], batched


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` next tokens."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def probe_step(model, tokenizer, cache: MemoryCache, history: torch.Tensor, final: bool = False) -> float:
    """Run the memory steps of a cache whose policy requests a probe: its probe first, then the steps.

    The probe (:meth:`Policy.probe_ids` of the tokens since the previous memory step) runs through the cache in
    one forward pass, teacher-forced; the cache captures its queries and keys, takes it out again, and the due
    steps (every layer's, with ``final``: the forced step of question-agnostic mode) score with it.

    Args:
        model, tokenizer: the model and its tokenizer.
        cache: the :class:`MemoryCache` after a forward call: one row, or copies of one prompt (a population;
            the rows then differ only in what their memory steps kept).
        history: ``(1, n_seen)`` (or ``(B, n_seen)`` identical rows) ids of every token the cache has seen.
        final: run a step in every layer now (:meth:`MemoryCache.compress_now`) rather than the due ones.

    Returns:
        Seconds spent in the probe's forward pass (0 when no step was due).
    """
    start, end = cache.unstepped_start(), history.shape[1]
    if start >= end or not (final or cache.steps_due()):
        return 0.0
    t0, stepping = time.perf_counter(), cache.stats.memory_seconds
    # every row has seen the same tokens (one prompt, or copies of it for a population): one probe, every row
    ids = cache.policy.probe_ids(tokenizer, history[:1, start:end], history[:1, :start])
    ids = ids.expand(cache.batch_rows, -1)
    # each layer steps as soon as its part of the probe has run (the probe's tokens in one layer at a time)
    with cache.probe(capture=True, steps="all" if final else "due"):
        clear_pending()
        model(input_ids=ids.to(model.device), use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    seconds = time.perf_counter() - t0 - (cache.stats.memory_seconds - stepping)
    if final:  # nothing left to do where every layer stepped inside the probe
        cache.compress_now()
    else:
        cache.run_due_steps()
    return seconds


def encode_answer(tokenizer, answer: str, max_tokens: int | None = None) -> torch.Tensor:
    """``(1, A)`` ids of a gold answer as :func:`generate` scores it (no special tokens, at most ``max_tokens``)."""
    ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_tokens]
    if ids.shape[1] == 0:
        raise NammError(f"The gold answer {answer!r} has no tokens to score.")
    return ids


def score_answer(model, cache: MemoryCache, last_logits: torch.Tensor, ids: torch.Tensor) -> list[AnswerScore]:
    """Teacher-force answer ``ids`` ``(1, A)`` against ``cache`` (taken out again) in every row; ``last_logits``
    ``(B, V)`` predict the first of them. One :class:`AnswerScore` per row."""
    ids = ids.to(last_logits.device).expand(last_logits.shape[0], -1)
    logits = last_logits.float()[:, None]
    if ids.shape[1] > 1:
        with cache.probe():
            clear_pending()
            out = model(input_ids=ids[:, :-1], use_cache=True, **{cache_argument(model): cache})
        logits = torch.cat([logits, out.logits.float()], dim=1)
    gold = logits.gather(-1, ids[..., None]).squeeze(-1)  # (B, A)
    logprob = (gold - torch.logsumexp(logits, dim=-1)).sum(-1)
    rival = logits.scatter(-1, ids[..., None], float("-inf")).amax(-1)
    margins = (gold - rival).tolist()
    return [AnswerScore(float(v), int(ids.shape[1]), tuple(m)) for v, m in zip(logprob.tolist(), margins, strict=True)]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str | Sequence[str] | torch.Tensor,
    policy: Policy,
    max_new_tokens: int = 64,
    delay: int = 512,
    chunk_size: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    return_logits: bool = False,
    ignore_eos: bool = False,
    question: str | None = None,
    answer: str | None = None,
    max_answer_tokens: int | None = None,
    prefill_hook: PrefillHook | None = None,
) -> GenerationResult:
    """Generate with a KV cache managed by ``policy``.

    Args:
        model: a transformers causal LM (routed through namm's attention by :func:`namm.attention.enable`).
        tokenizer: its tokenizer.
        prompt: a string, a list of strings (a left-padded batch) or token ids ``(N,)`` / ``(B, N)``.
        policy: the eviction policy, e.g. ``namm.policies.H2O(budget=256)``.
        max_new_tokens: generation length cap (EOS stops a row earlier).
        delay: a memory step runs every ``delay`` tokens, counted by absolute position (prefill and decoding).
            When the prompt ends between two of these steps and a policy's budget is exceeded, one more step
            runs at the end of the prompt (:meth:`MemoryCache.end_prompt`), so the budget holds before decoding.
        chunk_size: prefill chunk length; chunks end on absolute multiples of it. Must divide ``delay``.
            Defaults to ``delay``, or to the whole prompt for a policy that never evicts (``Full``).
        do_sample, temperature, top_p, seed: sampling (greedy by default).
        return_logits: also return the logits of every generated token.
        ignore_eos: always generate ``max_new_tokens`` tokens (benchmarks).
        question: question-agnostic mode (as in kvpress): ``prompt`` is the context; it is prefilled and
            compressed by a memory step in every layer before ``question`` is appended and answered.
        answer: a gold answer to score teacher-forced right after the prompt (and the question), against the
            cache as the memory steps left it; no memory step runs inside the answer. The result's ``answer``
            holds its :class:`AnswerScore` (a list when a hook made several rows). Decoding then starts from
            the same cache (``max_new_tokens=0`` skips it). One prompt only.
        max_answer_tokens: score at most this many of the answer's first tokens.
        prefill_hook: a :class:`PrefillHook` called between prefill forward calls (e.g. one prompt fanned
            out to one row per NAMM population member: ``namm.evolution.population.generate_copies``).

    Returns:
        A :class:`GenerationResult` with the text, the generated ids and :class:`GenerationStats`.
    """
    request = policy.request
    one_pass = chunk_size is None and not request.evicts and not request.attention
    chunk_size = delay if chunk_size is None else chunk_size
    if not isinstance(delay, int) or isinstance(delay, bool) or delay < 1:
        raise NammError(f"delay must be a positive number of tokens, got {delay!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1 or delay % chunk_size:
        raise NammError(f"chunk_size ({chunk_size}) must be a positive divisor of delay ({delay}).")
    if max_new_tokens < 0:
        raise NammError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    input_ids, mask, batched = _encode(tokenizer, prompt)
    context_len = input_ids.shape[1]
    if question is not None:
        if batched or not question.strip():
            raise NammError("question= needs a single prompt (the context) and a non-empty question string.")
        q_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"]
        input_ids = torch.cat([input_ids, q_ids], dim=1)
        mask = torch.ones_like(input_ids)
    probing = request.probe
    if probing and input_ids.shape[0] != 1:
        raise NammError(f"The {policy.describe()} policy needs a single prompt (no batch; copies of one prompt for a "
                        "population are fine).")
    if answer is not None and input_ids.shape[0] != 1:
        raise NammError("Scoring an answer needs a single prompt (a prefill hook may repeat it, e.g. for a "
                        "population).")
    b, n = input_ids.shape
    if n == 0:
        raise NammError("Empty prompt: it has no tokens.")
    answer_ids = None if answer is None else encode_answer(tokenizer, answer, max_answer_tokens)
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and answer_ids is not None and n + answer_ids.shape[1] > limit:
        raise NammError(f"The prompt ({n} tokens) plus the answer to score ({answer_ids.shape[1]} tokens) exceeds the "
                        f"model's context of {limit} tokens; pass max_answer_tokens or shorten the prompt.")
    if limit and n + max_new_tokens > limit:
        raise NammError(
            f"The prompt ({n} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{limit} tokens; shorten the prompt (e.g. LongBench middle truncation) or generate fewer tokens."
        )
    policy.validate(n + max_new_tokens)
    device = model.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    padded = not bool(mask.all())
    cache = MemoryCache(model, policy, delay=delay)
    if probing:
        cache.hold_steps()  # the engine runs them, after the probe (probe_step)
    probe_seconds = 0.0
    cache.auto_end_prompt = False  # the prompt ends where the prefill below ends
    cache_kw = cache_argument(model)
    meter = _Meter(cache)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def forward(ids: torch.Tensor, start: int, hook: PrefillHook | None = None) -> torch.Tensor:
        end = start + ids.shape[1]
        kwargs = {}
        if padded:
            kwargs["attention_mask"] = full_mask[:, :end]
            kwargs["position_ids"] = (full_mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end]
        nonlocal probe_seconds
        clear_pending()
        kwargs[cache_kw] = cache
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        if hook is not None:  # before the probe: a hook that fans the prompt out does it before any step runs
            hook.after_forward(cache, end)
        if probing:
            seen = input_ids if end <= n else torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
            probe_seconds += probe_step(model, tokenizer, cache, seen[:, :end])
        meter.record(ids.shape[1], end)
        return out.logits[:, -1]

    full_mask = torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
    if one_pass:
        chunk_size = n  # nothing to keep in step with: prefill at once, as plain transformers does
    generated: list[torch.Tensor] = []
    t0 = time.perf_counter()
    start = 0
    if prefill_hook is not None:
        prefill_hook.begin(cache, input_ids)
    while start < n:
        end = min(n, (start // chunk_size + 1) * chunk_size)
        if start < context_len < end and question is not None:
            end = context_len
        logits = forward(input_ids[:, start:end], start, prefill_hook)
        start = end
        if cache.batch_rows != b:  # the hook fanned the one prompt row out to several
            b = cache.batch_rows
            input_ids, mask, full_mask = (t.expand(b, -1) for t in (input_ids, mask, full_mask))
            logits = logits.expand(b, -1)
        if question is not None and start == context_len:
            if probing:
                probe_seconds += probe_step(model, tokenizer, cache, input_ids[:, :start], final=True)
            else:
                cache.compress_now()
    if question is None:  # question-agnostic mode compressed the context; the question stays whole
        if not probing:
            cache.end_prompt()
        elif cache.prompt_over_budget():
            probe_seconds += probe_step(model, tokenizer, cache, input_ids[:, :n], final=True)
    prefill_seconds = time.perf_counter() - t0
    scored = None
    if answer_ids is not None:
        scored = score_answer(model, cache, logits, answer_ids)

    eos = set() if ignore_eos else _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    all_logits: list[torch.Tensor] = []
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        if return_logits:
            all_logits.append(logits.float().cpu())
        token = _sample(logits, do_sample, temperature, top_p, gen).to(device)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        done |= torch.isin(token, torch.tensor(sorted(eos), device=device)) if eos else done
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = forward(token[:, None], n + i)
    decode_seconds = time.perf_counter() - t1

    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(b)]
    rows = [_cut_at_eos(row, eos) for row in rows]
    texts = [tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True) for row in rows]
    stats = _stats(cache, meter, mask, rows, prefill_seconds, decode_seconds)
    stats.probe_seconds = probe_seconds
    logits_out = torch.stack(all_logits, dim=1) if return_logits and all_logits else None
    if batched or b > 1:
        return GenerationResult(texts, rows, stats, logits_out, scored)
    return GenerationResult(texts[0], rows[0], stats, logits_out, scored[0] if scored else None)


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def _stats(cache, meter: _Meter, mask, rows, prefill_seconds, decode_seconds) -> GenerationStats:
    kept = cache.kept_tokens().float()  # (L, B, H)
    steps = [{"layer": s.layer_idx, "n_seen": s.n_seen, "kept": s.kept.tolist()} for s in cache.stats.steps]
    peak_before = max((int(s.before.max()) for s in cache.stats.steps), default=0)
    w = max(meter.weight, 1.0)
    return GenerationStats(
        prompt_tokens=mask.sum(dim=1).tolist(),
        generated_tokens=[len(r) for r in rows],
        kept_tokens=kept.mean(dim=1).tolist(),
        steps=steps,
        mean_kv_tokens=meter.tokens / w,
        row_mean_kv_tokens=(meter.row_tokens / w).tolist() if meter.row_tokens is not None else [],
        peak_kv_tokens=max(meter.peak_tokens, peak_before),
        full_kv_tokens=int(mask.shape[1] + max((len(r) for r in rows), default=0)),
        kv_bytes=cache.kv_bytes(),
        mean_kv_bytes=meter.bytes / w,
        peak_kv_bytes=cache.stats.peak_bytes,
        padding_fraction=cache.padding_fraction(),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        memory_seconds=cache.stats.memory_seconds,
        _mean_full_tokens=meter.full / w,
    )
