"""Per-head evicting storage for one full-attention layer: a plain store, with no reference to its cache.

An :class:`EvictingLayer` holds, per batch row and KV head, the kept tokens' keys and values in position
order, each token's original absolute position, a validity mask and per-token policy state. It can append
tokens, mark left padding, build the slot mask an attention call needs, keep recent queries, compact to a
keep mask, index its batch and take a probe's tokens out again. It decides nothing: *when* a memory step
runs and *what* it keeps is :class:`namm.cache.MemoryCache`'s business (with :mod:`namm.step`), which also
accounts for the bytes stored.

After a compaction the storage is shrunk to the longest head; shorter heads are padded with invalid slots. Where
that padding would be a large share of the layer (a policy that shares one budget between heads, so that one head
keeps nearly all of its tokens and another few), the layer stores each KV head apart instead (*ragged*: one
single-head store per KV head, each as long as its own kept tokens), so the bytes stored are the tokens kept. A
ragged layer still shows a memory step the usual ``(B, H, T, ...)`` tensors (:attr:`EvictingLayer.keys` and the
rest stack the heads, padded at the front, for the length of the step), and its attention runs head by head
(:meth:`EvictingLayer.head_slots`).
Keys are stored post-RoPE, so evicting tokens does not move anyone's position; new tokens keep absolute
positions (``get_seq_length`` is the number of tokens processed, not the number stored).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from namm.errors import NammError

#: Room a new append buffer gets beyond what it holds: at least this many slots, and at least a quarter more.
HEADROOM = 256

#: A compaction after which at least this share of a layer's slots would be padding between its KV heads stores
#: each head apart (ragged), so the padding is not stored.
RAGGED_MIN_SAVING = 0.125


def _append_in_place(
    held: torch.Tensor, new: torch.Tensor, dim: int, buffer: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``held`` with ``new`` appended along ``dim``, as a prefix view of a buffer with room to grow.

    When ``held`` is the prefix view of ``buffer`` (same storage start and strides) and the buffer has room,
    only ``new`` is written; otherwise (first append, or ``held`` was replaced by a compaction, a batch index or a
    slice) a new buffer with :data:`HEADROOM` is filled from ``held``. So appending a token copies the token,
    not everything held, as ``torch.cat`` would. Returns ``(view, buffer)``.
    """
    n, m = held.shape[dim], new.shape[dim]
    fits = (buffer is not None and buffer.shape[dim] >= n + m and buffer.dtype == new.dtype
            and buffer.shape[:dim] == held.shape[:dim] and buffer.shape[dim + 1 :] == held.shape[dim + 1 :]
            and held.data_ptr() == buffer.data_ptr() and held.stride() == buffer.stride())
    if not fits:
        shape = list(held.shape)
        shape[dim] = n + m + max(HEADROOM, (n + m) // 4)
        buffer = held.new_empty(shape)
        buffer.narrow(dim, 0, n).copy_(held)
    buffer.narrow(dim, n, m).copy_(new)
    return buffer.narrow(dim, 0, n + m), buffer


def _gather_slots(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, H, T, ...)`` at slots ``idx`` ``(B, H, T')`` (along dim 2)."""
    index = idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
    return t.gather(2, index)


def _stack_heads(parts: list[torch.Tensor]) -> torch.Tensor:
    """``(B, H, T, ...)``: single-head ``(B, 1, T_h, ...)`` tensors side by side, each padded with zeros (False)
    at the front to the longest ``T``, so that every head's newest slot is the last."""
    t = max(p.shape[2] for p in parts)
    first = parts[0]
    out = first.new_zeros(first.shape[0], len(parts), t, *first.shape[3:])
    for h, part in enumerate(parts):
        out[:, h : h + 1, t - part.shape[2] :] = part
    return out


def _lower_triangle(n: int, device) -> torch.Tensor:
    """``(n, n)`` bool, True on and below the diagonal."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


class EvictingLayer(DynamicLayer):
    """Per-head evicting storage for one full-attention layer (a transformers cache layer).

    Tensors (``B`` rows, ``H`` KV heads, ``T`` slots, ``D`` head dim):
    ``keys``/``values`` ``(B, H, T, D)``, ``positions`` ``(B, H, T)`` int64, ``valid`` ``(B, H, T)`` bool,
    ``state[name]`` ``(B, H, T, ...)`` per-token policy state, ``queries`` ``(B, H_q, Q, D)`` the recent
    queries kept for the next memory step, ``real`` ``(B, n_seen)`` bool which absolute positions are real
    tokens, ``probe_queries`` ``(B, H_q, P, D)`` the queries of a probe being captured.

    Counters: ``n_seen`` tokens processed (absolute), ``last_step`` the value of ``n_seen`` at the last
    memory step (the tokens since then are the ones the next step sees first).
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int):
        self.heads: list[EvictingLayer] | None = None  # ragged: one single-head store per KV head
        self._state: dict[str, torch.Tensor] = {}
        super().__init__()
        self.layer_idx = layer_idx
        self.n_seen = 0
        self.last_step = 0
        self.dense = True  # slot i holds position i and every slot is valid: plain SDPA applies
        self.padded = False  # some processed token was left padding
        # Slot metadata; None while the layer is dense (slot i = position i, all valid, no padding), in which
        # case the properties below derive it on demand and decoding skips three concatenations per token.
        self._positions: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.probe_queries: torch.Tensor | None = None
        # Storage with room to grow, by name ("keys", "values", "positions", "valid", "real", "queries",
        # "state:<name>"): each of those tensors is a prefix view of its buffer, so appending a token writes it in
        # place instead of copying everything held (what ``torch.cat`` does, as DynamicCache does, at every
        # decoded token). Any other assignment (compaction, batch indexing, probe removal, a policy's new state)
        # leaves the view and the next append starts a new buffer from it (:func:`_append_in_place`).
        self._buffers: dict[str, torch.Tensor] = {}

    # --- stored tensors (stacked over the heads when ragged) ---------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """``(B, H, T, D)``; when ragged, a stacked copy (for a memory step, not for the attention)."""
        return self._keys if self.heads is None else _stack_heads([h.keys for h in self.heads])

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        """``(B, H, T, D_v)``; when ragged, a stacked copy."""
        return self._values if self.heads is None else _stack_heads([h.values for h in self.heads])

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Per-token policy state, ``name -> (B, H, T, ...)``; when ragged, stacked copies: assign the dict back
        (``layer.state = state``) to store a change."""
        if self.heads is None:
            return self._state
        return {name: _stack_heads([h.state[name] for h in self.heads]) for name in self.heads[0].state}

    @state.setter
    def state(self, value: dict[str, torch.Tensor]) -> None:
        if self.heads is None:
            self._state = value
            return
        for h, head in enumerate(self.heads):
            n = head.slots
            head.state = {name: t[:, h : h + 1, t.shape[2] - n :] for name, t in value.items()}

    @property
    def ragged(self) -> bool:
        """Whether each KV head is stored apart (see the module's docstring)."""
        return self.heads is not None

    @property
    def slots(self) -> int:
        """Slots per head and row as a memory step sees them (``T``; when ragged, the longest head's)."""
        return self._keys.shape[2] if self.heads is None else max(h.slots for h in self.heads)

    def slot_shape(self) -> tuple[int, int, int]:
        """``(B, H, T)`` of the tensors a memory step sees (no stacked copy is made)."""
        if self.heads is None:
            return tuple(self._keys.shape[:3])
        return self.heads[0]._keys.shape[0], len(self.heads), self.slots

    def step_nbytes(self) -> int:
        """Bytes of the keys and values a memory step sees: the stored ones, or, when ragged, the stacked copy
        that exists while the step runs."""
        if self.heads is None:
            return self.nbytes
        b, h, t = self.slot_shape()
        first = self.heads[0]
        return b * h * t * (first._keys.shape[-1] * first._keys.element_size()
                            + first._values.shape[-1] * first._values.element_size())

    def storage_slots(self) -> tuple[int, int]:
        """``(stored, valid)`` slot counts over rows and heads (padding is ``stored - valid``)."""
        if self.heads is not None:
            counts = [h.storage_slots() for h in self.heads]
            return sum(c[0] for c in counts), sum(c[1] for c in counts)
        return self.valid.numel(), int(self.valid.sum())

    # --- slot metadata -----------------------------------------------------------------------------
    @property
    def positions(self) -> torch.Tensor:
        if self.heads is not None:
            return _stack_heads([h.positions for h in self.heads])
        if self._positions is None:
            b, h, t = self.keys.shape[:3]
            self._positions = torch.arange(t, device=self.device).expand(b, h, t).clone()
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor) -> None:
        self._positions = value

    @property
    def valid(self) -> torch.Tensor:
        if self.heads is not None:
            return _stack_heads([h.valid for h in self.heads])
        if self._valid is None:
            self._valid = torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.device)
        return self._valid

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._valid = value

    @property
    def real(self) -> torch.Tensor:
        if self._real is None:
            self._real = torch.ones(self.slot_shape()[0], self.n_seen, dtype=torch.bool, device=self.device)
        return self._real

    @real.setter
    def real(self, value: torch.Tensor) -> None:
        self._real = value

    def _forget_dense_metadata(self) -> None:
        """Back to derived metadata (only valid while the layer is dense)."""
        self._positions = self._valid = self._real = None

    def kept_counts(self) -> torch.Tensor:
        """``(B, H)`` valid tokens per row and head."""
        if self.heads is not None:
            return torch.cat([h.kept_counts() for h in self.heads], dim=1)
        if self._valid is None:
            return torch.full(self.keys.shape[:2], self.keys.shape[2], dtype=torch.long, device=self.device)
        return self._valid.sum(dim=-1)

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage (padding slots included; 0 before the first token). The append buffers
        hold up to ``max(HEADROOM, a quarter)`` more slots than this, allocated but not yet written."""
        if self.heads is not None:
            return sum(h.nbytes for h in self.heads)
        return self._keys.nbytes + self._values.nbytes if self.is_initialized else 0

    # --- transformers Cache layer API -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, H, Q, D)`` new keys/values; return the whole storage for the attention call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if self.heads is not None:
            return self._update_heads(key_states, value_states)
        if self._positions is not None:
            new_pos = torch.arange(self.n_seen, self.n_seen + q, device=self.device)
            self._positions = self._append("positions", self._positions, new_pos.expand(b, h, q), 2)
        if self._valid is not None:
            self._valid = self._append("valid", self._valid, self._valid.new_ones(b, h, q), 2)
        if self._real is not None:
            self._real = self._append("real", self._real, self._real.new_ones(b, q), 1)
        if self.keys.dim() != 4:  # transformers' lazy initialisation leaves 1-D empty tensors
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.keys = self._append("keys", self.keys, key_states, 2)
        self.values = self._append("values", self.values, value_states, 2)
        for name, tensor in self._state.items():
            pad = tensor.new_zeros(b, h, q, *tensor.shape[3:])
            self._state[name] = self._append(f"state:{name}", tensor, pad, 2)
        self.n_seen += q
        return self.keys, self.values

    def _update_heads(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """:meth:`update` of a ragged layer: each head's store takes its head's ``(B, 1, Q, D)`` keys and values.

        Returns the first head's keys and values: placeholders, since the attention of a ragged layer reads each
        head's slots from :meth:`head_slots`, never what ``update`` returns."""
        q = key_states.shape[2]
        for h, head in enumerate(self.heads):
            head.update(key_states[:, h : h + 1], value_states[:, h : h + 1])
        if self._real is not None:
            self._real = self._append("real", self._real, self._real.new_ones(self._real.shape[0], q), 1)
        self.n_seen += q
        return self.heads[0]._keys, self.heads[0]._values

    def _append(self, name: str, held: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        """``held`` + ``new`` along ``dim``, in the buffer kept under ``name`` (see :func:`_append_in_place`)."""
        view, self._buffers[name] = _append_in_place(held, new, dim, self._buffers.get(name))
        return view

    def get_seq_length(self) -> int:
        """Tokens processed so far (absolute), which is what transformers derives positions from."""
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks are built over absolute positions; :mod:`namm.attention` maps them onto the slots."""
        return self.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NammError("A namm cache cannot be cropped (evicted tokens cannot be restored).")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.index_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.index_batch(torch.arange(self.slot_shape()[0], device=self.device).repeat_interleave(repeats))

    def index_batch(self, idx: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``idx`` ``(B',)`` of everything stored."""
        if not self.is_initialized:
            return
        idx = idx.to(self.device)
        if self.heads is not None:
            for head in self.heads:
                head.index_batch(idx)
            self.real = self.real[idx]
        else:
            self.keys, self.values = self.keys[idx], self.values[idx]
            if self.dense:
                self._forget_dense_metadata()
            else:
                self.positions, self.valid, self.real = self.positions[idx], self.valid[idx], self.real[idx]
            self.state = {k: v[idx] for k, v in self.state.items()}
        if self.queries is not None:
            self.queries = self.queries[idx]

    # --- what an attention call needs -------------------------------------------------------------
    def mark_padding(self, real: torch.Tensor) -> None:
        """Mark the last appended call's left-padding tokens as not real and their slots invalid.

        ``real``: ``(B, Q)`` or ``(1, Q)`` bool, which of the call's ``Q`` tokens are real.
        """
        q = real.shape[1]
        if real.shape[0] != self.real.shape[0]:
            real = real.expand(self.real.shape[0], -1)
        self.real[:, self.n_seen - q :] = real
        for store in self.heads or [self]:
            store.valid[:, :, -q:] &= real[:, None, :]
            store.dense, store.padded = False, True
        self.dense = False
        self.padded = True

    def head_slots(self, q: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """A ragged layer's slots head by head, for the attention of the last call's ``q`` queries.

        Returns, per KV head, its keys ``(B, 1, T_h, D)``, values ``(B, 1, T_h, D_v)`` and the ``(B, 1, Q, T_h)``
        bool mask of the slots each query may attend to (``None`` when a single query may see every slot).
        """
        out = []
        for head in self.heads:
            full = q == 1 and not head.padded and bool(head.valid.all())
            out.append((head._keys, head._values, None if full else head.slot_mask(q)))
        return out

    def slot_mask(self, q: int) -> torch.Tensor:
        """``(B, H, Q, T)`` bool: which slots each of the last call's ``q`` queries may attend to.

        This call's tokens are the last ``q`` slots (appended in order), so causality only concerns them;
        every older slot is visible wherever it is valid.
        """
        b, h, t = self.valid.shape
        allowed = self.valid[:, :, None, :].expand(b, h, q, t).clone()
        allowed[..., t - q :] &= _lower_triangle(q, self.device)
        if self.padded:  # padding queries may see nothing; let them see everything (outputs unused)
            allowed |= ~allowed.any(dim=-1, keepdim=True)
        return allowed

    def keep_queries(self, query: torch.Tensor, window: int | None) -> None:
        """Append ``(B, H_q, Q, D)`` queries to the ones kept for the next memory step; keep the last
        ``window`` (``None``: all of them)."""
        query = query.detach()
        self.queries = query if self.queries is None else self._append("queries", self.queries, query, 2)
        if window is not None and self.queries.shape[2] > window:
            self.queries = self.queries[:, :, -window:]

    def keep_probe_queries(self, query: torch.Tensor) -> None:
        """Append ``(B, H_q, P, D)`` queries of a probe being captured."""
        query = query.detach()
        self.probe_queries = query if self.probe_queries is None else torch.cat([self.probe_queries, query], 2)

    def query_positions(self) -> torch.Tensor:
        """``(Q,)`` int64 absolute positions of the kept queries."""
        return torch.arange(self.n_seen - self.queries.shape[2], self.n_seen, device=self.device)

    # --- eviction and probes -----------------------------------------------------------------------
    def compact(self, keep: torch.Tensor) -> None:
        """Keep the ``(B, H, T)`` slots set in ``keep``; shrink storage to the longest head, or store the heads
        apart where padding them to the longest would waste :data:`RAGGED_MIN_SAVING` of the layer or more."""
        if self.heads is not None:
            for h, head in enumerate(self.heads):
                head.compact(keep[:, h : h + 1, keep.shape[2] - head.slots :])
            return
        counts = keep.sum(dim=-1)  # (B, H)
        length = int(counts.max())
        sort_key = torch.where(keep, self.positions, torch.iinfo(torch.long).max)
        idx = sort_key.argsort(dim=-1, stable=True)[..., :length]  # kept slots in position order first
        head_lengths = counts.max(dim=0).values  # (H,): each head's longest row
        if counts.shape[1] > 1 and int(head_lengths.sum()) <= (1 - RAGGED_MIN_SAVING) * length * counts.shape[1]:
            self._store_heads_apart(idx, counts, head_lengths.tolist())
            return
        self.keys, self.values = _gather_slots(self.keys, idx), _gather_slots(self.values, idx)
        self.positions = self.positions.gather(2, idx)
        self.valid = torch.arange(length, device=self.device) < counts[..., None]
        self.state = {k: _gather_slots(v, idx) for k, v in self.state.items()}
        self.dense = False

    def _store_heads_apart(self, idx: torch.Tensor, counts: torch.Tensor, lengths: list[int]) -> None:
        """Become ragged: head ``h`` keeps slots ``idx[:, h, :lengths[h]]`` (``idx`` ``(B, H, T')``, kept slots in
        position order first; ``counts`` ``(B, H)`` kept per row and head) in a single-head store of its own."""
        positions, valid_from = self.positions, torch.arange(max(lengths), device=self.device)
        heads = []
        for h, n in enumerate(lengths):
            i = idx[:, h : h + 1, :n]
            head = EvictingLayer(self.layer_idx)
            head.device, head.is_initialized = self.device, True
            head.keys = _gather_slots(self._keys[:, h : h + 1], i)
            head.values = _gather_slots(self._values[:, h : h + 1], i)
            head.positions = positions[:, h : h + 1].gather(2, i)
            head.valid = valid_from[:n] < counts[:, h : h + 1, None]
            head.state = {k: _gather_slots(v[:, h : h + 1], i) for k, v in self._state.items()}
            head.n_seen, head.last_step, head.dense, head.padded = self.n_seen, self.last_step, False, self.padded
            heads.append(head)
        self.heads = heads
        self._keys = self._values = self._positions = self._valid = None
        self._state = {}
        self._buffers = {k: v for k, v in self._buffers.items() if k in ("real", "queries")}
        self.dense = False

    def mark_stepped(self) -> None:
        """A memory step has seen every token so far: forget the kept queries."""
        self.queries = None
        self.last_step = self.n_seen
        if self.dense:
            self._forget_dense_metadata()

    def drop_probe(self, n_seen: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Remove the tokens appended since the layer had seen ``n_seen`` (a probe).

        Returns:
            the probe's captured queries ``(B, H_q, P, D)`` (``None`` if none were kept) and its keys
            ``(B, H, P, D)`` (``None`` if no token was appended).
        """
        p = self.n_seen - n_seen
        queries, self.probe_queries = self.probe_queries, None
        if p <= 0:
            return None, None
        if self.heads is not None:
            keys = torch.cat([head.drop_probe(n_seen)[1] for head in self.heads], dim=1)
            if self._real is not None:
                self._real = self._real[:, :-p]
            self.n_seen = n_seen
            return queries, keys
        keys = self.keys[:, :, -p:].clone()  # the next append writes over these slots of the buffer
        self.keys, self.values = self.keys[:, :, :-p], self.values[:, :, :-p]
        if self._positions is not None:
            self._positions = self._positions[..., :-p]
        if self._valid is not None:
            self._valid = self._valid[..., :-p]
        if self._real is not None:
            self._real = self._real[:, :-p]
        self.state = {k: v[:, :, :-p] for k, v in self.state.items()}
        self.n_seen = n_seen
        if self.dense:
            self._forget_dense_metadata()
        return queries, keys
