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

# The free functions live in ``_blockmask_index`` (block geometry, array intake, index forms,
# host converters) and ``_prepare_mask``; they are re-exported here, so
# ``from refattn.core.blockmask import ...`` keeps working for every name.
from ._blockmask_index import (  # noqa: F401  (re-exported)
    _as_bool4,
    _block_bounds,
    _bsr_form,
    _flex_form,
    _ordered,
    _token_mask,
    check_index_form,
    full_blocks,
    legal_blocks,
    num_blocks,
)
from ._device_mask import _as_bool4_device, _ordered_device  # noqa: F401  (re-exported)
from ._prepare_mask import prepare_mask  # noqa: F401  (re-exported)
from .errors import InputError
from .layout import array_module as _xp
from .layout import causal_offset  # noqa: F401  (re-exported)
from .layout import is_device_array as _is_device

HEAD_KINDS = ("q", "kv")


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
        if causal is None:
            part, full = self.mask, None
        else:
            p, f = self.split_full(causal)
            part, full = p.mask, f.mask
        return {"BLOCK_SIZE": (self.block_q, self.block_k),
                "seq_lengths": (self.q_len, self.k_len), **_flex_form(part, full)}

    def to_bsr(self) -> tuple[np.ndarray, np.ndarray]:
        """Block-CSR per (b, h): ``indptr int32 [B,H,Qb+1]`` and ``indices int32 [B,H,nnz_max]``
        (ascending per row, rows concatenated; ``-1`` past each head's nnz)."""
        if self.on_device:
            return self.to_host().to_bsr()
        return _bsr_form(self.mask)

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        """Token-level mask bool ``[B, H, q_len, k_len]`` (causal bottom-right when asked).
        Always a NumPy array."""
        if self.on_device:
            return self.to_host().to_token_mask(causal)
        return _token_mask(self.mask, self.block_q, self.block_k, self.q_len, self.k_len, causal)

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
