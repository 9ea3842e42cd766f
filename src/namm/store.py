"""Per-head evicting storage for one full-attention layer: a plain store, with no reference to its cache.

An :class:`EvictingLayer` holds, per batch row and KV head, the kept tokens' keys and values in position
order, each token's original absolute position, a validity mask and per-token policy state. It can append
tokens, mark left padding, build the slot mask an attention call needs, keep recent queries, compact to a
keep mask, index its batch and take a probe's tokens out again. It decides nothing: *when* a memory step
runs and *what* it keeps is :class:`namm.cache.MemoryCache`'s business (with :mod:`namm.step`), which also
accounts for the bytes stored.

After a compaction the storage is shrunk to the longest head; shorter heads are padded with invalid slots.
Keys are stored post-RoPE, so evicting tokens does not move anyone's position; new tokens keep absolute
positions (``get_seq_length`` is the number of tokens processed, not the number stored).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from namm.errors import NammError

#: Room a new append buffer gets beyond what it holds: at least this many slots, and at least a quarter more.
HEADROOM = 256


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
        self.state: dict[str, torch.Tensor] = {}
        self.queries: torch.Tensor | None = None
        self.probe_queries: torch.Tensor | None = None
        # Storage with room to grow, by name ("keys", "values", "positions", "valid", "real", "queries",
        # "state:<name>"): each of those tensors is a prefix view of its buffer, so appending a token writes it in
        # place instead of copying everything held (what ``torch.cat`` does, as DynamicCache does, at every
        # decoded token). Any other assignment (compaction, batch indexing, probe removal, a policy's new state)
        # leaves the view and the next append starts a new buffer from it (:func:`_append_in_place`).
        self._buffers: dict[str, torch.Tensor] = {}

    # --- slot metadata -----------------------------------------------------------------------------
    @property
    def positions(self) -> torch.Tensor:
        if self._positions is None:
            b, h, t = self.keys.shape[:3]
            self._positions = torch.arange(t, device=self.device).expand(b, h, t).clone()
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor) -> None:
        self._positions = value

    @property
    def valid(self) -> torch.Tensor:
        if self._valid is None:
            self._valid = torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.device)
        return self._valid

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._valid = value

    @property
    def real(self) -> torch.Tensor:
        if self._real is None:
            self._real = torch.ones(self.keys.shape[0], self.n_seen, dtype=torch.bool, device=self.device)
        return self._real

    @real.setter
    def real(self, value: torch.Tensor) -> None:
        self._real = value

    def _forget_dense_metadata(self) -> None:
        """Back to derived metadata (only valid while the layer is dense)."""
        self._positions = self._valid = self._real = None

    def kept_counts(self) -> torch.Tensor:
        """``(B, H)`` valid tokens per row and head."""
        if self._valid is None:
            return torch.full(self.keys.shape[:2], self.keys.shape[2], dtype=torch.long, device=self.device)
        return self._valid.sum(dim=-1)

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage (padding slots included; 0 before the first token). The append buffers
        hold up to ``max(HEADROOM, a quarter)`` more slots than this, allocated but not yet written."""
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0

    # --- transformers Cache layer API -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, H, Q, D)`` new keys/values; return the whole storage for the attention call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
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
        for name, tensor in self.state.items():
            pad = tensor.new_zeros(b, h, q, *tensor.shape[3:])
            self.state[name] = self._append(f"state:{name}", tensor, pad, 2)
        self.n_seen += q
        return self.keys, self.values

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
            self.index_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def index_batch(self, idx: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``idx`` ``(B',)`` of everything stored."""
        if not self.is_initialized:
            return
        idx = idx.to(self.device)
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
        self.valid[:, :, -q:] &= real[:, None, :]
        self.dense = False
        self.padded = True

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
        """Keep the ``(B, H, T)`` slots set in ``keep``; shrink storage to the longest head."""
        counts = keep.sum(dim=-1)  # (B, H)
        length = int(counts.max())
        sort_key = torch.where(keep, self.positions, torch.iinfo(torch.long).max)
        idx = sort_key.argsort(dim=-1, stable=True)[..., :length]  # kept slots in position order first

        def gather(t: torch.Tensor) -> torch.Tensor:
            index = idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
            return t.gather(2, index)

        self.keys, self.values = gather(self.keys), gather(self.values)
        self.positions = self.positions.gather(2, idx)
        self.valid = torch.arange(length, device=self.device) < counts[..., None]
        self.state = {k: gather(v) for k, v in self.state.items()}
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
