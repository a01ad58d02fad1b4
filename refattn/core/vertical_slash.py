"""``VerticalSlash``: MInference's token-level vertical-slash pattern (not a block mask).

A pattern holds, per (batch, query head),

* **vertical** key columns ``c``: every query sees key ``c``;
* **slash** diagonal offsets ``o >= 0``: query ``i`` sees key ``j = i + (k_len - q_len) - o``.

Offsets count back from the causal diagonal in key coordinates (bottom-right alignment, the
library's causal convention): ``o = 0`` is the main diagonal (each query's own position),
``o = 1`` the key just before it, and so on. This is MInference's convention: its estimator
returns ``(q_len - 1) - idx`` for the diagonal sum at index ``idx``, i.e. ``o = query - key``
(microsoft/MInference@fb56c917, ``minference/modules/minference_forward.py``,
``vertical_and_slash_kernel``). Every visible (query, key) pair lies on exactly one offset in
``[0, k_len - 1]``, which is therefore the offset range.

Storage is boolean and canonical: ``vertical bool [B, H, k_len]`` and ``slash bool
[B, H, k_len]`` (``slash[..., o]`` selects offset ``o``); ``B`` and ``H`` may be 1 and then
broadcast. :meth:`to_indices` gives MInference's index form (columns ascending, offsets
descending, ``-1`` past each count).

Two renderings of the same indices (``granularity``):

* ``"token"`` (default): exactly the selected columns and diagonals, the pattern the paper
  defines (MInference 1.0, arXiv 2407.02490, Sec. 3.2 / Alg. 2).
* ``"kernel"``: what the official PIT kernel computes. ``convert_vertical_slash_indexes``
  (``csrc/vertical_slash_index.cu``, 64x64) widens, for every 64-row query block ending at
  ``end``, each diagonal ``o < end`` into the 64 keys ``[max(end - o, 64) - 64,
  max(end - o, 64))`` it crosses there; windows are merged in offset order (a window that
  starts within 64 keys of the current range's end extends it by exactly 64 keys; a later
  one opens a new range); columns not inside a range and before the last range's end are
  kept as single keys. The kernel then masks causally. Needs ``q_len == k_len`` (as the
  official kernel).

Nothing here is forced into blocks; :meth:`covering_blockmask` gives the smallest
:class:`BlockMask` holding every selected token, for block-level tools.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .blockmask import BlockMask, num_blocks
from .errors import InputError
from .layout import causal_offset

GRANULARITIES = ("token", "kernel")
KERNEL_BLOCK = 64  # the official PIT kernel's BLOCK_SIZE_M = BLOCK_SIZE_N


def _bool3(x: Any, name: str, k_len: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != bool:
        raise InputError(f"VerticalSlash: {name} must be a boolean array, got dtype {a.dtype}")
    if not 1 <= a.ndim <= 3 or a.shape[-1] != k_len:
        raise InputError(f"VerticalSlash: {name} must be [k_len], [H, k_len] or [B, H, k_len] "
                         f"with k_len={k_len}, got shape {a.shape}")
    while a.ndim < 3:
        a = a[None]
    a = np.array(a, dtype=bool, copy=True)
    a.setflags(write=False)
    return a


def _index_dense(idx: Any, count: Any, name: str, k_len: int) -> np.ndarray:
    """Ragged integer index lists ``[B,H,N]`` (+ counts) -> boolean ``[B,H,k_len]``."""
    a = np.asarray(idx)
    if a.dtype.kind not in "iu":
        raise InputError(f"{name}: expected integer indices, got dtype {a.dtype}")
    if not 1 <= a.ndim <= 3:
        raise InputError(f"{name}: expected [N], [H, N] or [B, H, N], got shape {a.shape}")
    while a.ndim < 3:
        a = a[None]
    a = a.astype(np.int64)
    if count is None:
        live = np.ones(a.shape, dtype=bool)
    else:
        c = np.broadcast_to(np.asarray(count), a.shape[:2])
        if c.dtype.kind not in "iu" or (c < 0).any() or (c > a.shape[2]).any():
            raise InputError(f"{name}: counts must be integers in [0, {a.shape[2]}], got {count!r}")
        live = np.arange(a.shape[2]) < c[..., None]
    vals = a[live]
    if vals.size and (vals.min() < 0 or vals.max() >= k_len):
        raise InputError(f"{name}: indices must lie in [0, {k_len}), got range "
                         f"[{vals.min()}, {vals.max()}]")
    dense = np.zeros(a.shape[:2] + (k_len,), dtype=bool)
    b, h, s = np.nonzero(live)
    dense[b, h, a[b, h, s]] = True
    return dense


def _ordered(dense: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``[B,H,N]`` -> (indices int32 ``[B,H,max count]``, -1 padded; counts int32)."""
    counts = dense.sum(axis=-1, dtype=np.int32)
    width = int(counts.max()) if counts.size else 0
    out = np.full(dense.shape[:2] + (width,), -1, dtype=np.int32)
    for b in range(dense.shape[0]):
        for h in range(dense.shape[1]):
            idx = np.nonzero(dense[b, h])[0]
            out[b, h, : idx.size] = idx[::-1] if descending else idx
    return out, counts


def pit_key_set(vertical: np.ndarray, slash: np.ndarray, end: int, k_len: int) -> np.ndarray:
    """Keys the official PIT kernel computes for the 64-row query block ending at ``end``
    (exclusive, possibly past ``q_len`` for the last block): bool ``[k_len]``, before the
    causal mask. ``vertical`` / ``slash`` are boolean ``[k_len]`` (columns, offsets).

    Mirrors ``convert_vertical_slash_indexes_kernel``: diagonal ``o < end`` covers the window
    ending at ``x = max(end - o, 64)``; windows are taken in decreasing ``o`` (increasing
    ``x``); a window with ``x > range_end + 64`` closes the current range and opens
    ``[x - 64, x)``; one with ``range_end < x <= range_end + 64`` extends the range by
    exactly 64 keys. Columns below the last range's end that no range holds are kept.
    """
    B = KERNEL_BLOCK
    offs = np.nonzero(slash[: min(end, k_len)])[0][::-1]       # offsets < end, descending
    keys = np.zeros(k_len, dtype=bool)
    if offs.size == 0:  # the official kernel reads past its array here; keep the columns
        keys[: min(end, k_len)] = vertical[: min(end, k_len)]
        return keys
    x = np.maximum(end - offs, B)                                # non-decreasing
    # A new range can only start where x jumps by more than 64; walk those candidates.
    starts, ends = [int(x[0]) - B], []
    r_end = int(x[0])
    for t in np.nonzero(np.diff(x) > B)[0] + 1:
        # inside a range starting at S the end has grown, in 64-key steps, to cover the
        # last window seen: S + 64 * ceil((x - S) / 64)
        r_end = starts[-1] + B * -(-(int(x[t - 1]) - starts[-1]) // B)
        if x[t] > r_end + B:
            ends.append(r_end)
            starts.append(int(x[t]) - B)
    r_end = starts[-1] + B * -(-(int(x[-1]) - starts[-1]) // B)
    ends.append(r_end)
    for s, e in zip(starts, ends, strict=True):
        keys[max(s, 0): min(e, k_len)] = True
    last = min(ends[-1], k_len)
    keys[:last] |= vertical[:last]
    return keys


class VerticalSlash:
    """Vertical columns and slash diagonals per (batch, query head), see the module doc.

    Parameters
    ----------
    vertical: bool ``[B, H, k_len]`` (or ``[H, k_len]``, ``[k_len]``): selected key columns.
    slash: bool, same shape: ``slash[..., o]`` selects the diagonal at offset ``o``
        (query ``i`` sees key ``i + k_len - q_len - o``).
    q_len, k_len: sequence lengths.
    granularity: ``"token"`` (exact pattern) or ``"kernel"`` (the official 64x64 PIT
        kernel's widened diagonals; needs ``q_len == k_len``).
    """

    __slots__ = ("vertical", "slash", "q_len", "k_len", "granularity")
    head_kind = "q"

    def __init__(self, vertical: Any, slash: Any, *, q_len: int, k_len: int,
                 granularity: str = "token") -> None:
        for name, val in (("q_len", q_len), ("k_len", k_len)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise InputError(f"VerticalSlash: {name} must be a positive integer, got {val!r}")
        if granularity not in GRANULARITIES:
            raise InputError(f"VerticalSlash: granularity must be one of {GRANULARITIES}, "
                             f"got {granularity!r}")
        if granularity == "kernel" and q_len != k_len:
            raise InputError(f"VerticalSlash: granularity='kernel' needs q_len == k_len (the "
                             f"official kernel's restriction), got {q_len} and {k_len}")
        v = _bool3(vertical, "vertical", int(k_len))
        s = _bool3(slash, "slash", int(k_len))
        if v.shape[:2] != s.shape[:2]:
            raise InputError(f"VerticalSlash: vertical {v.shape[:2]} and slash {s.shape[:2]} "
                             "differ in (batch, heads)")
        self.vertical, self.slash = v, s
        self.q_len, self.k_len = int(q_len), int(k_len)
        self.granularity = granularity

    @classmethod
    def from_indices(cls, vertical: Any, slash: Any, *, q_len: int, k_len: int,
                     vertical_count: Any = None, slash_count: Any = None,
                     granularity: str = "token") -> "VerticalSlash":
        """From integer lists ``vertical [B,H,NV]`` (key columns) and ``slash [B,H,NS]``
        (offsets), in any order, repeats allowed. With ``*_count [B,H]`` only the first
        ``count`` slots of each list are read (padding is ignored)."""
        v = _index_dense(vertical, vertical_count, "vertical", int(k_len))
        s = _index_dense(slash, slash_count, "slash", int(k_len))
        return cls(v, s, q_len=q_len, k_len=k_len, granularity=granularity)

    # ----------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, q_len, k_len)`` (B, H may be 1 and broadcast)."""
        return self.vertical.shape[:2] + (self.q_len, self.k_len)  # type: ignore[return-value]

    def batch_heads(self) -> tuple[int, int]:
        return self.vertical.shape[0], self.vertical.shape[1]

    def __repr__(self) -> str:
        return (f"VerticalSlash(B={self.shape[0]}, H={self.shape[1]}, len=({self.q_len}, "
                f"{self.k_len}), columns={int(self.vertical.sum())}, "
                f"diagonals={int(self.slash.sum())}, granularity={self.granularity!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerticalSlash):
            return NotImplemented
        return (self.shape == other.shape and self.granularity == other.granularity
                and bool(np.array_equal(self.vertical, other.vertical))
                and bool(np.array_equal(self.slash, other.slash)))

    __hash__ = None  # type: ignore[assignment]

    def to_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """MInference's index form: ``vertical int32 [B,H,NV]`` ascending, ``vertical_count
        int32 [B,H]``, ``slash int32 [B,H,NS]`` offsets descending, ``slash_count``; every
        slot past a count is ``-1``."""
        v, vc = _ordered(self.vertical, descending=False)
        s, sc = _ordered(self.slash, descending=True)
        return v, vc, s, sc

    def _bh(self, b: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        bb = b if self.vertical.shape[0] > 1 else 0
        hh = h if self.vertical.shape[1] > 1 else 0
        return self.vertical[bb, hh], self.slash[bb, hh]

    def _kernel_rows(self, vert: np.ndarray, sl: np.ndarray, r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0, self.k_len), dtype=bool)
        for m in range(r0 // KERNEL_BLOCK, -(-r1 // KERNEL_BLOCK)):
            a, e = max(r0, m * KERNEL_BLOCK), min(r1, (m + 1) * KERNEL_BLOCK)
            out[a - r0: e - r0] = pit_key_set(vert, sl, (m + 1) * KERNEL_BLOCK, self.k_len)
        return out

    # ------------------------------------------------------------- token mask
    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        """Token-level rows ``[r0, r1)`` of heads ``[h0, h1)`` of batch ``b``: bool
        ``[Hm, r1-r0, k_len]`` (``Hm`` 1 when the pattern broadcasts over heads). No causal
        mask is applied (the ``token_rows`` protocol of :func:`refattn.attention`)."""
        heads = range(h0, h1) if self.vertical.shape[1] > 1 else range(1)
        out = np.empty((len(heads), r1 - r0, self.k_len), dtype=bool)
        for n, h in enumerate(heads):
            out[n] = self._head_rows(*self._bh(b, h), r0, r1)
        return out

    def _head_rows(self, vert: np.ndarray, sl: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of one head's pattern: bool ``[r1-r0, k_len]``, no causal mask."""
        if self.granularity == "kernel":
            return self._kernel_rows(vert, sl, r0, r1)
        # (i, j) lies on offset o = p_i - j, p_i = i + Sk - Sq its key position
        p = np.arange(r0, r1) + causal_offset(self.q_len, self.k_len)
        o = p[:, None] - np.arange(self.k_len)[None, :]
        return vert[None, :] | (sl[np.clip(o, 0, self.k_len - 1)] & (o >= 0))

    def to_token_mask(self, causal: bool = True) -> np.ndarray:
        """The pattern as bool ``[B, H, q_len, k_len]`` (bottom-right causal when asked)."""
        B, H = self.batch_heads()
        t = np.stack([self.token_rows(b, 0, H, 0, self.q_len) for b in range(B)])
        if causal:
            t &= _causal(self.q_len, self.k_len, 0, self.q_len)[None, None]
        return t

    # ------------------------------------------------------------ block view
    def covering_blockmask(self, block_q: int, block_k: int, causal: bool = True) -> BlockMask:
        """The smallest :class:`BlockMask` (``[B, H, Qb, Kb]``) whose blocks hold every selected
        token (every selected *visible* token under ``causal``)."""
        for name, val in (("block_q", block_q), ("block_k", block_k)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise InputError(f"covering_blockmask: {name} must be a positive integer, "
                                 f"got {val!r}")
        B, H = self.batch_heads()
        qb, kb = num_blocks(self.q_len, block_q), num_blocks(self.k_len, block_k)
        off = causal_offset(self.q_len, self.k_len)
        first = np.arange(qb) * block_q
        last = np.minimum(first + block_q, self.q_len) - 1
        out = np.zeros((B, H, qb, kb), dtype=bool)
        for b in range(B):
            for h in range(H):
                vert, sl = self._bh(b, h)
                if self.granularity == "kernel":
                    out[b, h] = self._cover_kernel(vert, sl, block_q, block_k, causal)
                    continue
                # columns: row block I holds (i, c) visibly iff c <= its last query position
                cols = np.nonzero(vert)[0]
                lim = last + off if causal else np.full(qb, self.k_len - 1)
                hit = cols[None, :] <= lim[:, None]
                rI, cI = np.nonzero(hit)
                out[b, h, rI, cols[cI] // block_k] = True
                # diagonals: offset o crosses keys [first+off-o, last+off-o] in row block I
                offs = np.nonzero(sl)[0]
                lo = np.maximum(first[:, None] + off - offs[None, :], 0)
                hi = np.minimum(last[:, None] + off - offs[None, :], self.k_len - 1)
                rI, oI = np.nonzero(lo <= hi)
                diff = np.zeros((qb, kb + 1), dtype=np.int64)
                np.add.at(diff, (rI, lo[rI, oI] // block_k), 1)
                np.add.at(diff, (rI, hi[rI, oI] // block_k + 1), -1)
                out[b, h] |= np.cumsum(diff, axis=1)[:, :kb] > 0
        return BlockMask(out, block_q=block_q, block_k=block_k, q_len=self.q_len,
                         k_len=self.k_len)

    def _cover_kernel(self, vert: np.ndarray, sl: np.ndarray, block_q: int, block_k: int,
                      causal: bool) -> np.ndarray:
        qb, kb = num_blocks(self.q_len, block_q), num_blocks(self.k_len, block_k)
        out = np.zeros((qb, kb), dtype=bool)
        cuts = np.union1d(np.arange(0, self.q_len, block_q), np.arange(0, self.q_len, KERNEL_BLOCK))
        cuts = np.append(cuts, self.q_len)
        pad = kb * block_k - self.k_len
        # segments of rows that share one kernel key set and one covering row block
        for a, e in zip(cuts[:-1], cuts[1:], strict=True):
            keys = pit_key_set(vert, sl, (a // KERNEL_BLOCK + 1) * KERNEL_BLOCK, self.k_len)
            if causal:
                keys = keys & (np.arange(self.k_len) <= e - 1)
            out[a // block_q] |= np.pad(keys, (0, pad)).reshape(kb, block_k).any(axis=1)
        return out

    def density(self, causal: bool = True, per_head: bool = False) -> Any:
        """Selected (visible, under ``causal``) token pairs over all (visible) pairs.
        ``per_head=True`` gives ``[B, H]``."""
        B, H = self.batch_heads()
        p = np.arange(self.q_len) + causal_offset(self.q_len, self.k_len)
        if causal:
            total = int(np.clip(p + 1, 0, self.k_len).sum())
        else:
            total = self.q_len * self.k_len
        sel = np.zeros((B, H), dtype=np.int64)
        for b in range(B):
            for h in range(H):
                vert, sl = self._bh(b, h)
                sel[b, h] = self._count(vert, sl, p, causal)
        dens = sel / max(total, 1)
        return dens if per_head else float(dens.mean())

    def _count(self, vert: np.ndarray, sl: np.ndarray, p: np.ndarray, causal: bool) -> int:
        n = self.k_len
        if self.granularity == "kernel":
            total = 0
            for r0 in range(0, self.q_len, 4 * KERNEL_BLOCK):
                r1 = min(self.q_len, r0 + 4 * KERNEL_BLOCK)
                t = self._kernel_rows(vert, sl, r0, r1)
                if causal:
                    t &= _causal(self.q_len, self.k_len, r0, r1)
                total += int(t.sum())
            return total
        # row i (key position p): |columns seen| + |diagonals inside [0, p]| - |both|,
        # where "both" counts pairs (c, o) with c + o = p (a convolution of the indicators).
        cv = np.concatenate([[0], np.cumsum(vert)])
        cs = np.concatenate([[0], np.cumsum(sl)])
        size = 1 << int(2 * n - 1).bit_length()
        conv = np.fft.irfft(np.fft.rfft(vert.astype(float), size)
                            * np.fft.rfft(sl.astype(float), size), size)
        both = np.rint(conv[:n]).astype(np.int64)
        ok = p >= 0
        pc = np.clip(p, 0, n - 1)
        ncol = cv[pc + 1] if causal else np.full(p.size, cv[-1])
        return int(np.where(ok, ncol + cs[pc + 1] - both[pc], 0).sum()
                   + (0 if causal else np.where(ok, 0, cv[-1]).sum()))


def _causal(q_len: int, k_len: int, r0: int, r1: int) -> np.ndarray:
    """Bottom-right causal visibility of rows ``[r0, r1)``: bool ``[r1-r0, k_len]``."""
    return np.arange(k_len)[None, :] <= (np.arange(r0, r1)[:, None] + causal_offset(q_len, k_len))
