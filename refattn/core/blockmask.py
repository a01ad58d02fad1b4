"""``BlockMask``: which (query block, key block) tiles an attention computes.

A mask is boolean ``[B, H, Qb, Kb]`` with ``Qb = ceil(q_len / block_q)`` and
``Kb = ceil(k_len / block_k)``; the last block on either axis may be partial (it holds
``q_len - (Qb-1)*block_q`` rows). ``B`` and ``H`` may be 1 and then broadcast. The head
axis has an explicit kind: ``"q"`` (one mask per query head, as FlexAttention and most
methods) or ``"kv"`` (one per kv head, as SnapKV/kvpress); :meth:`BlockMask.expand_heads`
turns the second into the first. Per-token routing (MoBA) is ``block_q = 1``.

Index form (canonical, one byte-exact form per mask):
``kv_num_blocks int32 [B, H, Qb]`` and ``kv_indices int32 [B, H, Qb, Kb]``, the selected key
blocks of each row ascending, every slot past the count ``-1``. :meth:`to_flex` gives
FlexAttention's form instead (tail filled with the unselected blocks, ascending, exactly as
``torch.nn.attention.flex_attention._dense_to_ordered``), so that
``BlockMask.from_kv_blocks`` on it agrees bit for bit with ``create_block_mask``.

Device masks: a mask built from a CuPy (or any ``__cuda_array_interface__``) boolean array
stays on the GPU (:attr:`BlockMask.on_device`). Its index form, transpose, head expansion,
algebra and density are computed there, so a GPU selection feeds the GPU attention with no
host round trip. The analysis converters (``to_flex``, ``to_bsr``, ``to_token_mask``,
``token_rows``, ``split_full``, ``check``) copy to the host first; :meth:`BlockMask.to_host`
and :meth:`BlockMask.to_device` move a mask explicitly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._device_mask import _as_bool4_device, _ordered_device
from .errors import InputError
from .layout import array_module as _xp
from .layout import causal_offset
from .layout import is_device_array as _is_device

HEAD_KINDS = ("q", "kv")


def num_blocks(length: int, block: int) -> int:
    """``ceil(length / block)``."""
    return -(-int(length) // int(block))


def _block_bounds(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last (inclusive) token index of every block, ``[nb]`` each."""
    n = num_blocks(length, block)
    start = np.arange(n, dtype=np.int64) * block
    stop = np.minimum(start + block, length) - 1
    return start, stop


def legal_blocks(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """Blocks that hold at least one visible (query, key) pair: bool ``[Qb, Kb]``.

    Causal is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``.
    Without causality every block is legal.
    """
    qs, qe = _block_bounds(q_len, block_q)
    ks, _ = _block_bounds(k_len, block_k)
    if not causal:
        return np.ones((qs.size, ks.size), dtype=bool)
    off = causal_offset(q_len, k_len)
    return ks[None, :] <= (qe[:, None] + off)


def full_blocks(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """Blocks that no token-level mask cuts: bool ``[Qb, Kb]``.

    A block is *full* when it has ``block_q x block_k`` tokens (not a ragged last block) and,
    under causality, every key of it is visible to every query of it. Other legal blocks are
    *partial* (FlexAttention applies ``mask_mod`` only to partial blocks).
    """
    qs, qe = _block_bounds(q_len, block_q)
    ks, ke = _block_bounds(k_len, block_k)
    whole = ((qe - qs + 1) == block_q)[:, None] & ((ke - ks + 1) == block_k)[None, :]
    if not causal:
        return whole
    off = causal_offset(q_len, k_len)
    return whole & (ke[None, :] <= qs[:, None] + off)


def _as_bool4(mask: Any) -> np.ndarray:
    if _is_device(mask):
        return _as_bool4_device(mask)
    m = np.asarray(mask)
    if m.dtype != bool:
        if m.dtype.kind in "iu" and m.size and not np.isin(m, (0, 1)).all():
            raise InputError(f"mask: expected booleans (or 0/1), got values {np.unique(m)[:5]}")
        if m.dtype.kind not in "biu":
            raise InputError(f"mask: expected a boolean array, got dtype {m.dtype}")
        m = m.astype(bool)
    if not 2 <= m.ndim <= 4:
        raise InputError(f"mask: expected [Qb, Kb], [H, Qb, Kb] or [B, H, Qb, Kb], "
                         f"got shape {m.shape}")
    while m.ndim < 4:
        m = m[None]
    return np.ascontiguousarray(m)


def _ordered(dense: np.ndarray, fill: str) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ordered index form of a boolean ``[..., n]`` array.

    ``fill="canonical"``: slots past the count are -1. ``fill="flex"``: they hold the
    unselected indices, ascending (a stable descending argsort of the mask).
    Device arrays give device results (the same values).
    """
    if _is_device(dense):
        return _ordered_device(dense, fill)
    counts = dense.sum(axis=-1, dtype=np.int32)
    order = np.argsort(~dense, axis=-1, kind="stable").astype(np.int32)
    if fill == "canonical":
        slot = np.arange(dense.shape[-1], dtype=np.int32)
        order = np.where(slot < counts[..., None], order, np.int32(-1))
    return counts, order


def check_index_form(kv_num_blocks: Any, kv_indices: Any, num_k_blocks: int,
                     *, canonical: bool = True) -> None:
    """Validate an index form; raise :class:`InputError` naming the first problem.

    ``canonical=True`` also requires ascending indices and ``-1`` past every count.
    """
    num = np.asarray(kv_num_blocks)
    idx = np.asarray(kv_indices)
    if num.dtype.kind not in "iu" or idx.dtype.kind not in "iu":
        raise InputError(f"index form: expected integer arrays, got {num.dtype} and {idx.dtype}")
    if idx.shape[:-1] != num.shape:
        raise InputError(f"kv_indices: leading shape {idx.shape[:-1]} does not match "
                         f"kv_num_blocks {num.shape}")
    if num.size and (num.min() < 0 or num.max() > min(num_k_blocks, idx.shape[-1])):
        raise InputError(f"kv_num_blocks: counts must lie in [0, {min(num_k_blocks, idx.shape[-1])}], "
                         f"got range [{num.min()}, {num.max()}]")
    slot = np.arange(idx.shape[-1])
    live = slot < num[..., None]
    vals = np.where(live, idx, 0)
    if live.any() and (vals[live].min() < 0 or vals[live].max() >= num_k_blocks):
        raise InputError(f"kv_indices: selected block indices must lie in [0, {num_k_blocks}), "
                         f"got range [{vals[live].min()}, {vals[live].max()}]")
    srt = np.sort(np.where(live, idx.astype(np.int64), np.int64(np.iinfo(np.int64).max)), axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (slot[1:] < num[..., None])
    if dup.any():
        pos = tuple(int(i) for i in np.argwhere(dup)[0][:-1])
        raise InputError(f"kv_indices: a block index repeats within row {pos}")
    if canonical:
        if (np.diff(vals, axis=-1)[live[..., 1:]] <= 0).any():
            raise InputError("kv_indices: canonical form needs ascending indices within each row")
        if (idx[~live] != -1).any():
            raise InputError("kv_indices: canonical form needs -1 in every slot past the count")


class BlockMask:
    """Boolean block mask ``[B, H, Qb, Kb]`` with its geometry.

    Parameters
    ----------
    mask: bool ``[Qb, Kb]``, ``[H, Qb, Kb]`` or ``[B, H, Qb, Kb]`` (missing axes become 1
        and broadcast).
    block_q, block_k: block sizes in tokens (``block_q = 1`` for per-token routing).
    q_len, k_len: sequence lengths; ``Qb = ceil(q_len/block_q)``, ``Kb = ceil(k_len/block_k)``.
    head_kind: ``"q"`` (H is the number of query heads, or 1) or ``"kv"`` (kv heads).
    """

    __slots__ = ("mask", "block_q", "block_k", "q_len", "k_len", "head_kind")

    def __init__(self, mask: Any, *, block_q: int, block_k: int, q_len: int, k_len: int,
                 head_kind: str = "q") -> None:
        for name, val in (("block_q", block_q), ("block_k", block_k), ("q_len", q_len),
                          ("k_len", k_len)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise InputError(f"BlockMask: {name} must be a positive integer, got {val!r}")
        if head_kind not in HEAD_KINDS:
            raise InputError(f"BlockMask: head_kind must be one of {HEAD_KINDS}, got {head_kind!r}")
        m = _as_bool4(mask)
        qb, kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
        if m.shape[2:] != (qb, kb):
            raise InputError(f"BlockMask: mask has {m.shape[2:]} blocks, but q_len={q_len}, "
                             f"block_q={block_q}, k_len={k_len}, block_k={block_k} give "
                             f"(Qb, Kb) = ({qb}, {kb})")
        if m is mask:
            m = m.copy()
        if not _is_device(m):
            m.setflags(write=False)
        self.mask = m
        self.block_q, self.block_k = int(block_q), int(block_k)
        self.q_len, self.k_len = int(q_len), int(k_len)
        self.head_kind = head_kind

    # ----------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def num_q_blocks(self) -> int:
        return self.mask.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return self.mask.shape[3]

    @property
    def on_device(self) -> bool:
        """True when the mask lives on the GPU (a CuPy array)."""
        return _is_device(self.mask)

    def to_host(self) -> "BlockMask":
        """The same mask with a NumPy array (``self`` when already on the host)."""
        return self.like(self.mask.get()) if self.on_device else self

    def to_device(self) -> "BlockMask":
        """The same mask with a CuPy array (``self`` when already on the device)."""
        if self.on_device:
            return self
        import cupy

        return self.like(cupy.asarray(self.mask))

    def _host_mask(self) -> np.ndarray:
        return self.mask.get() if self.on_device else self.mask

    def _legal(self, causal: bool, full: bool = False) -> Any:
        """``legal_blocks`` (or ``full_blocks``) in the mask's array module."""
        f = full_blocks if full else legal_blocks
        return _xp(self.mask).asarray(f(self.q_len, self.k_len, self.block_q, self.block_k,
                                        causal))

    def geometry(self) -> tuple[int, int, int, int, str]:
        return (self.block_q, self.block_k, self.q_len, self.k_len, self.head_kind)

    def like(self, mask: Any) -> "BlockMask":
        """A mask with the same geometry and new contents."""
        return BlockMask(mask, block_q=self.block_q, block_k=self.block_k, q_len=self.q_len,
                         k_len=self.k_len, head_kind=self.head_kind)

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, block=({self.block_q}, {self.block_k}), "
                f"len=({self.q_len}, {self.k_len}), head_kind={self.head_kind!r}, "
                f"blocks={int(self.mask.sum())}{', device' if self.on_device else ''})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMask):
            return NotImplemented
        return self.geometry() == other.geometry() and self.shape == other.shape and bool(
            np.array_equal(self._host_mask(), other._host_mask()))

    __hash__ = None  # type: ignore[assignment]

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, mask: Any, *, block_q: int, block_k: int, q_len: int, k_len: int,
                   head_kind: str = "q") -> "BlockMask":
        """Same as the constructor; named for symmetry with :meth:`to_dense`."""
        return cls(mask, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                   head_kind=head_kind)

    @classmethod
    def full(cls, batch: int, heads: int, *, q_len: int, k_len: int, block_q: int = 128,
             block_k: int = 128, causal: bool = False, head_kind: str = "q") -> "BlockMask":
        """Every block (every legal block under ``causal``) selected."""
        legal = legal_blocks(q_len, k_len, block_q, block_k, causal)
        m = np.broadcast_to(legal, (batch, heads) + legal.shape)
        return cls(np.array(m), block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                   head_kind=head_kind)

    @classmethod
    def from_indices(cls, kv_num_blocks: Any, kv_indices: Any, *, block_q: int, block_k: int,
                     q_len: int, k_len: int, head_kind: str = "q") -> "BlockMask":
        """Build from an index form. Slots past each count are ignored (canonical ``-1``
        or FlexAttention's tail fill both work); selected indices must be unique and in range.
        """
        num = np.asarray(kv_num_blocks)
        idx = np.asarray(kv_indices)
        kb = num_blocks(k_len, block_k)
        check_index_form(num, idx, kb, canonical=False)
        while num.ndim < 3:
            num, idx = num[None], idx[None]
        live = np.arange(idx.shape[-1]) < num[..., None]
        dense = np.zeros(num.shape + (kb,), dtype=bool)
        b, h, r, s = np.nonzero(live)
        dense[b, h, r, idx[b, h, r, s]] = True
        return cls(dense, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                   head_kind=head_kind)

    # ------------------------------------------------------------- converters
    def to_dense(self) -> np.ndarray:
        """The boolean ``[B, H, Qb, Kb]`` array (read-only)."""
        return self.mask

    def to_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical index form: ``kv_num_blocks int32 [B,H,Qb]``, ``kv_indices int32
        [B,H,Qb,Kb]`` ascending, ``-1`` past the count."""
        return _ordered(self.mask, "canonical")

    def transpose(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical transposed form for backward: ``q_num_blocks int32 [B,H,Kb]`` and
        ``q_indices int32 [B,H,Kb,Qb]`` (for each key block, the query blocks that selected it)."""
        return _ordered(_xp(self.mask).swapaxes(self.mask, -1, -2), "canonical")

    def split_full(self, causal: bool = False) -> tuple["BlockMask", "BlockMask"]:
        """``(partial, full)``: the selected blocks that a token-level mask cuts (causal
        diagonal, ragged last block) and those it does not. ``partial | full == self``."""
        full = self.mask & self._legal(causal, full=True)
        return self.like(self.mask & ~full), self.like(full)

    def to_flex(self, *, causal: bool | None = None) -> dict[str, Any]:
        """Arrays for ``torch.nn.attention.flex_attention.BlockMask.from_kv_blocks``.

        Returns ``kv_num_blocks``, ``kv_indices`` (FlexAttention's tail fill), ``q_num_blocks``,
        ``q_indices`` (its transpose, same fill), ``BLOCK_SIZE = (block_q, block_k)`` and
        ``seq_lengths``. With ``causal`` given, the partial/full split is made: ``kv_*`` hold
        the partial blocks and ``full_kv_*`` / ``full_q_*`` the full ones.
        """
        if self.on_device:
            return self.to_host().to_flex(causal=causal)
        out: dict[str, Any] = {"BLOCK_SIZE": (self.block_q, self.block_k),
                               "seq_lengths": (self.q_len, self.k_len)}
        if causal is None:
            part, full = self.mask, None
        else:
            p, f = self.split_full(causal)
            part, full = p.mask, f.mask
        out["kv_num_blocks"], out["kv_indices"] = _ordered(part, "flex")
        out["q_num_blocks"], out["q_indices"] = _ordered(np.swapaxes(part, -1, -2), "flex")
        if full is not None:
            out["full_kv_num_blocks"], out["full_kv_indices"] = _ordered(full, "flex")
            out["full_q_num_blocks"], out["full_q_indices"] = _ordered(
                np.swapaxes(full, -1, -2), "flex")
        return out

    def to_bsr(self) -> tuple[np.ndarray, np.ndarray]:
        """Block-CSR per (b, h): ``indptr int32 [B,H,Qb+1]`` and ``indices int32 [B,H,nnz_max]``
        (ascending per row, rows concatenated; ``-1`` past each head's nnz)."""
        if self.on_device:
            return self.to_host().to_bsr()
        counts = self.mask.sum(-1, dtype=np.int32)
        indptr = np.zeros(counts.shape[:2] + (counts.shape[2] + 1,), dtype=np.int32)
        np.cumsum(counts, axis=-1, out=indptr[..., 1:])
        nnz = indptr[..., -1]
        width = int(nnz.max()) if nnz.size else 0
        indices = np.full(counts.shape[:2] + (width,), -1, dtype=np.int32)
        for b in range(counts.shape[0]):
            for h in range(counts.shape[1]):
                indices[b, h, : nnz[b, h]] = np.nonzero(self.mask[b, h])[1]
        return indptr, indices

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        """Token-level mask bool ``[B, H, q_len, k_len]`` (causal bottom-right when asked).
        Always a NumPy array."""
        if self.on_device:
            return self.to_host().to_token_mask(causal)
        t = np.repeat(np.repeat(self.mask, self.block_q, axis=2)[:, :, : self.q_len],
                      self.block_k, axis=3)[:, :, :, : self.k_len]
        if causal:
            off = causal_offset(self.q_len, self.k_len)
            t = t & (np.arange(self.k_len)[None, :] <= np.arange(self.q_len)[:, None] + off)
        return t

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        """Token-level rows ``[r0, r1)`` of heads ``[h0, h1)`` of batch ``b``: bool
        ``[Hm, r1-r0, k_len]`` with ``Hm`` 1 (mask broadcast over heads) or ``h1-h0``.
        No causal mask is applied. ``"kv"`` masks must be expanded first."""
        if self.head_kind != "q":
            raise InputError("token_rows: expand a 'kv' mask to query heads first")
        m = self._host_mask()[b if self.shape[0] > 1 else 0]
        m = m if m.shape[0] == 1 else m[h0:h1]
        rows = m[:, np.arange(r0, r1) // self.block_q]            # [Hm, R, Kb]
        return np.repeat(rows, self.block_k, axis=2)[:, :, : self.k_len]

    def expand_heads(self, num_q_heads: int) -> "BlockMask":
        """A ``"kv"`` mask repeated over the query heads of each group (``"q"`` kind).

        A ``"q"`` mask is returned unchanged (its H must be 1 or ``num_q_heads``)."""
        H = self.shape[1]
        if self.head_kind == "q":
            if H not in (1, num_q_heads):
                raise InputError(f"mask: {H} query-head masks do not match {num_q_heads} query heads")
            return self
        if H == 1:
            m = self.mask
        else:
            if num_q_heads % H:
                raise InputError(f"mask: {num_q_heads} query heads are not a multiple of the "
                                 f"mask's {H} kv heads")
            m = _xp(self.mask).repeat(self.mask, num_q_heads // H, axis=1)
        return BlockMask(m, block_q=self.block_q, block_k=self.block_k, q_len=self.q_len,
                         k_len=self.k_len, head_kind="q")

    # ---------------------------------------------------------------- algebra
    def _compatible(self, other: "BlockMask", op: str) -> None:
        if not isinstance(other, BlockMask):
            raise InputError(f"{op}: expected a BlockMask, got {type(other).__name__}")
        if self.geometry() != other.geometry():
            raise InputError(f"{op}: masks differ in geometry {self.geometry()} vs {other.geometry()}")

    def _other_mask(self, other: "BlockMask") -> Any:
        """``other``'s array on this mask's side (host or device)."""
        if other.on_device == self.on_device:
            return other.mask
        return (other.to_device() if self.on_device else other.to_host()).mask

    def union(self, other: "BlockMask") -> "BlockMask":
        self._compatible(other, "union")
        return self.like(self.mask | self._other_mask(other))

    def intersection(self, other: "BlockMask") -> "BlockMask":
        self._compatible(other, "intersection")
        return self.like(self.mask & self._other_mask(other))

    __or__ = union
    __and__ = intersection

    def with_causal(self) -> "BlockMask":
        """Drop blocks that hold no causally visible (query, key) pair."""
        return self.like(self.mask & self._legal(True))

    # ---------------------------------------------------------------- queries
    def density(self, causal: bool = False, per_head: bool = False) -> Any:
        """Selected legal blocks over legal blocks (under ``causal``, only blocks holding a
        visible pair count). ``per_head=True`` gives ``[B, H]``."""
        legal = self._legal(causal)
        sel = (self.mask & legal).sum(axis=(-1, -2))
        tot = max(int(legal.sum()), 1)
        if per_head:
            return sel / tot      # on the device for a device mask
        return float(sel.sum() / (tot * sel.size))

    def check(self) -> "BlockMask":
        """Validate the mask's invariants (raises :class:`InputError`); returns self."""
        if self.on_device:
            self.to_host().check()
            return self
        if self.mask.dtype != bool or self.mask.ndim != 4:
            raise InputError("BlockMask: mask must be a 4-d boolean array")
        qb, kb = num_blocks(self.q_len, self.block_q), num_blocks(self.k_len, self.block_k)
        if self.mask.shape[2:] != (qb, kb):
            raise InputError(f"BlockMask: mask blocks {self.mask.shape[2:]} != ({qb}, {kb})")
        num, idx = self.to_indices()
        check_index_form(num, idx, kb, canonical=True)
        return self


def prepare_mask(mask: Any, shape: Any) -> Any:
    """Validate a mask against the problem and expand a ``"kv"`` BlockMask to query heads.

    Accepts ``None``, a :class:`BlockMask`, or any object with ``q_len``, ``k_len``,
    ``batch_heads() -> (B, H)`` optional, and ``token_rows(b, h0, h1, r0, r1)``.
    """
    if mask is None:
        return None
    if not hasattr(mask, "token_rows"):
        raise InputError(f"mask: expected a BlockMask (or token-mask object), got {type(mask).__name__}")
    if (mask.q_len, mask.k_len) != (shape.q_len, shape.k_len):
        raise InputError(f"mask: built for (q_len, k_len) = ({mask.q_len}, {mask.k_len}) but the "
                         f"inputs have ({shape.q_len}, {shape.k_len})")
    if isinstance(mask, BlockMask):
        if mask.head_kind == "kv" and mask.shape[1] not in (1, shape.kv_heads):
            raise InputError(f"mask: {mask.shape[1]} kv-head masks for {shape.kv_heads} kv heads")
        mask = mask.expand_heads(shape.q_heads)
        B, H = mask.shape[:2]
        if B not in (1, shape.batch):
            raise InputError(f"mask: batch {B} does not match the inputs' {shape.batch}")
        if H not in (1, shape.q_heads):
            raise InputError(f"mask: {H} head masks do not match {shape.q_heads} query heads")
    elif hasattr(mask, "batch_heads"):
        B, H = mask.batch_heads()
        if B not in (1, shape.batch) or H not in (1, shape.q_heads):
            raise InputError(f"mask: token mask for (B, H) = ({B}, {H}) does not match the "
                             f"inputs' ({shape.batch}, {shape.q_heads})")
    return mask
