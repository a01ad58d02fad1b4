"""``KeepSet``: the tokens a KV-cache method keeps, per (batch, head).

KV-cache reduction methods (H2O, SnapKV, StreamingLLM, kvpress presses, ...) do not pick
blocks of a ``[Sq, Sk]`` grid: they keep a *set of cached tokens* per head, and every query
that comes later attends only to those tokens. A :class:`KeepSet` stores

* ``indices int64 [B, H, N]``: the kept token positions of each (batch, head), **in the order
  the official code keeps them** (SnapKV: top-k order then the window; H2O: ascending), every
  slot past the head's count ``-1``;
* ``counts int64 [B, H]``;
* ``q_len`` / ``k_len``: the attention problem the set applies to (``k_len`` = cache length
  before eviction, ``q_len`` = number of query rows that read the kept cache);
* ``head_kind``: ``"q"`` (one set per query head, as official SnapKV/H2O after ``repeat_kv``)
  or ``"kv"`` (one per kv head, as kvpress); :meth:`expand_heads` turns ``"kv"`` into ``"q"``.

Every query row sees the same kept keys; under ``causal`` the bottom-right causal rule
(query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``) is applied on top by the attention.
The token-mask protocol (``q_len``, ``k_len``, ``token_rows``) lets
:func:`refattn.attention` run an evicted cache directly.

:class:`TokenMask` is the general per-row token mask, for rules whose kept set changes from
row to row (H2O's single-forward simulation).

Budget helpers: :func:`resolve_budget` (a count or a ratio of the length) and
:func:`resolve_head_budgets` (one budget shared by every head, or one per head).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .blockmask import HEAD_KINDS, BlockMask
from .errors import InputError
from .layout import causal_offset


def _pos_int(name: str, val: Any, *, minimum: int = 1) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {val!r}")
    return int(val)


class KeepSet:
    """Kept token positions per (batch, head); see the module docstring.

    Parameters
    ----------
    indices: int ``[B, H, N]`` (or ``[H, N]``, B = 1), kept positions in keep order,
        ``-1`` past each head's count. Positions must be unique within a head and lie in
        ``[0, k_len)``.
    q_len, k_len: the attention problem (``Sq`` query rows over ``Sk`` cached tokens).
    head_kind: ``"q"`` or ``"kv"``.
    """

    __slots__ = ("indices", "counts", "q_len", "k_len", "head_kind")

    def __init__(self, indices: Any, *, q_len: int, k_len: int, head_kind: str = "q") -> None:
        q_len = _pos_int("KeepSet: q_len", q_len)
        k_len = _pos_int("KeepSet: k_len", k_len)
        if head_kind not in HEAD_KINDS:
            raise InputError(f"KeepSet: head_kind must be one of {HEAD_KINDS}, got {head_kind!r}")
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise InputError(f"KeepSet: indices must be integers, got dtype {idx.dtype}")
        if idx.ndim == 2:
            idx = idx[None]
        if idx.ndim != 3:
            raise InputError(f"KeepSet: indices must be [B, H, N] or [H, N], got shape {idx.shape}")
        idx = idx.astype(np.int64)
        live = idx >= 0
        counts = live.sum(-1)
        # canonical padding: every live slot precedes every -1
        if (live & ~(np.arange(idx.shape[-1]) < counts[..., None])).any():
            raise InputError(
                "KeepSet: indices must hold the kept positions first and -1 after them"
            )
        if live.any() and idx[live].max() >= k_len:
            raise InputError(
                f"KeepSet: kept positions must lie in [0, {k_len}), got max {idx[live].max()}"
            )
        srt = np.sort(np.where(live, idx, np.iinfo(np.int64).max), axis=-1)
        if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != np.iinfo(np.int64).max)).any():
            raise InputError("KeepSet: a position is kept twice within one head")
        idx.setflags(write=False)
        counts.setflags(write=False)
        self.indices, self.counts = idx, counts
        self.q_len, self.k_len, self.head_kind = q_len, k_len, head_kind

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_lists(
        cls, kept: Sequence[Sequence[Any]], *, q_len: int, k_len: int, head_kind: str = "q"
    ) -> "KeepSet":
        """From nested lists ``kept[b][h]`` = 1-d arrays of positions (keep order)."""
        B = len(kept)
        H = len(kept[0]) if B else 0
        if B == 0 or H == 0 or any(len(row) != H for row in kept):
            raise InputError("KeepSet.from_lists: expected a non-empty B x H nested list")
        width = max((len(np.asarray(x).reshape(-1)) for row in kept for x in row), default=0)
        idx = np.full((B, H, max(width, 1)), -1, dtype=np.int64)
        for b, row in enumerate(kept):
            for h, x in enumerate(row):
                x = np.asarray(x, dtype=np.int64).reshape(-1)
                idx[b, h, : x.size] = x
        return cls(idx, q_len=q_len, k_len=k_len, head_kind=head_kind)

    @classmethod
    def from_key_mask(cls, mask: Any, *, q_len: int, head_kind: str = "q") -> "KeepSet":
        """From a boolean ``[B, H, Sk]`` (or ``[H, Sk]``) key mask; positions ascending."""
        m = np.asarray(mask, dtype=bool)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise InputError(f"KeepSet.from_key_mask: expected [B, H, Sk], got shape {m.shape}")
        order = np.argsort(~m, axis=-1, kind="stable")
        idx = np.where(np.arange(m.shape[-1]) < m.sum(-1)[..., None], order, -1)
        return cls(idx, q_len=q_len, k_len=m.shape[-1], head_kind=head_kind)

    @classmethod
    def full(
        cls, batch: int, heads: int, *, q_len: int, k_len: int, head_kind: str = "q"
    ) -> "KeepSet":
        """Every token kept (no eviction), ascending."""
        idx = np.broadcast_to(np.arange(k_len, dtype=np.int64), (batch, heads, k_len))
        return cls(np.array(idx), q_len=q_len, k_len=k_len, head_kind=head_kind)

    # ----------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple[int, int]:
        """``(B, H)``."""
        return self.indices.shape[:2]  # type: ignore[return-value]

    def batch_heads(self) -> tuple[int, int]:
        return self.shape

    def kept(self, b: int, h: int) -> np.ndarray:
        """Kept positions of (b, h), in keep order: int64 ``[count]``."""
        return self.indices[b, h, : self.counts[b, h]]

    def key_mask(self) -> np.ndarray:
        """bool ``[B, H, Sk]``: True at kept positions."""
        B, H, N = self.indices.shape
        m = np.zeros((B, H, self.k_len + 1), dtype=bool)  # last slot absorbs the -1 padding
        np.put_along_axis(m, np.where(self.indices >= 0, self.indices, self.k_len), True, axis=-1)
        return m[..., : self.k_len]

    def sorted(self) -> "KeepSet":
        """The same sets with positions ascending (the canonical order)."""
        return KeepSet.from_key_mask(self.key_mask(), q_len=self.q_len, head_kind=self.head_kind)

    def with_q_len(self, q_len: int) -> "KeepSet":
        """The same kept keys, for ``q_len`` query rows."""
        return KeepSet(self.indices, q_len=q_len, k_len=self.k_len, head_kind=self.head_kind)

    def same_sets(self, other: "KeepSet") -> bool:
        """True when both keep the same positions in every head (order ignored)."""
        return (
            isinstance(other, KeepSet)
            and self.k_len == other.k_len
            and self.shape == other.shape
            and bool(np.array_equal(self.key_mask(), other.key_mask()))
        )

    def density(self) -> float:
        """Mean kept fraction over (batch, head)."""
        return float(self.counts.mean() / self.k_len)

    def __repr__(self) -> str:
        return (
            f"KeepSet(shape={self.shape}, len=({self.q_len}, {self.k_len}), "
            f"head_kind={self.head_kind!r}, kept={self.counts.min()}..{self.counts.max()})"
        )

    # ------------------------------------------------------------- converters
    def expand_heads(self, num_q_heads: int) -> "KeepSet":
        """A ``"kv"`` set repeated over the query heads of each GQA group (``"q"`` kind)."""
        H = self.shape[1]
        if self.head_kind == "q":
            if H not in (1, num_q_heads):
                raise InputError(
                    f"KeepSet: {H} query-head sets do not match {num_q_heads} query heads"
                )
            return self
        if num_q_heads % H:
            raise InputError(
                f"KeepSet: {num_q_heads} query heads are not a multiple of {H} kv heads"
            )
        return KeepSet(
            np.repeat(self.indices, num_q_heads // H, axis=1),
            q_len=self.q_len,
            k_len=self.k_len,
            head_kind="q",
        )

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        """Token-level mask bool ``[B, H, q_len, k_len]`` (causal bottom-right when asked)."""
        t = np.broadcast_to(self.key_mask()[:, :, None, :], self.shape + (self.q_len, self.k_len))
        if causal:
            off = causal_offset(self.q_len, self.k_len)
            t = t & (np.arange(self.k_len)[None, :] <= np.arange(self.q_len)[:, None] + off)
        return np.array(t)

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of heads ``[h0, h1)`` of batch ``b``: bool ``[Hm, R, Sk]``
        (``Hm`` = 1 when one set is shared by all heads). No causal mask is applied.
        A ``"kv"`` set with more than one head must be expanded first."""
        if self.head_kind != "q" and self.shape[1] != 1:
            raise InputError("KeepSet.token_rows: expand a 'kv' keep set to query heads first")
        km = self.key_mask()[b if self.shape[0] > 1 else 0]
        km = km if km.shape[0] == 1 else km[h0:h1]
        return np.broadcast_to(km[:, None, :], (km.shape[0], r1 - r0, self.k_len))

    def to_block_mask(self) -> BlockMask:
        """The kept tokens as a :class:`BlockMask` with ``block_q = q_len`` (one query block)
        and ``block_k = 1`` (one block per token): mask ``[B, H, 1, Sk]``."""
        return BlockMask(
            self.key_mask()[:, :, None, :],
            block_q=self.q_len,
            block_k=1,
            q_len=self.q_len,
            k_len=self.k_len,
            head_kind=self.head_kind,
        )


class TokenMask:
    """A per-row token mask bool ``[B, H, Sq, Sk]`` (``B``/``H`` may be 1 and broadcast),
    for rules whose kept keys change from one query row to the next. Implements the
    token-mask protocol used by :func:`refattn.attention`. ``head_kind`` as
    :class:`KeepSet`."""

    __slots__ = ("mask", "q_len", "k_len", "head_kind")

    def __init__(self, mask: Any, *, head_kind: str = "q") -> None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise InputError(f"TokenMask: expected a boolean array, got dtype {m.dtype}")
        while m.ndim < 4:
            m = m[None]
        if m.ndim != 4 or 0 in m.shape:
            raise InputError(
                f"TokenMask: expected a non-empty [B, H, Sq, Sk] array, got shape {m.shape}"
            )
        if head_kind not in HEAD_KINDS:
            raise InputError(f"TokenMask: head_kind must be one of {HEAD_KINDS}, got {head_kind!r}")
        m = m.copy()
        m.setflags(write=False)
        self.mask, self.head_kind = m, head_kind
        self.q_len, self.k_len = int(m.shape[2]), int(m.shape[3])

    def batch_heads(self) -> tuple[int, int]:
        return self.mask.shape[:2]  # type: ignore[return-value]

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        t = self.mask
        if causal:
            off = causal_offset(self.q_len, self.k_len)
            t = t & (np.arange(self.k_len)[None, :] <= np.arange(self.q_len)[:, None] + off)
        return np.array(t)

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        if self.head_kind != "q" and self.mask.shape[1] != 1:
            raise InputError(
                "TokenMask.token_rows: 'kv' masks with several heads are not supported"
            )
        m = self.mask[b if self.mask.shape[0] > 1 else 0]
        m = m if m.shape[0] == 1 else m[h0:h1]
        return m[:, r0:r1]


# ------------------------------------------------------------------ budgets
def resolve_budget(budget: Any, length: int, *, name: str = "budget") -> int:
    """Number of tokens to keep out of ``length``.

    * an integer ``>= 0``: that many tokens (at most ``length``);
    * a float in ``(0, 1]``: ``floor(budget * length)`` (the ``int(r * L)`` of H2O and
      kvpress).
    """
    if isinstance(budget, bool):
        raise InputError(f"{name}: expected a count or a ratio in (0, 1], got {budget!r}")
    if isinstance(budget, (int, np.integer)):
        if budget < 0:
            raise InputError(f"{name}: a token count must be >= 0, got {budget}")
        return min(int(budget), int(length))
    if isinstance(budget, (float, np.floating)):
        if not (0.0 < float(budget) <= 1.0):
            raise InputError(f"{name}: a ratio must lie in (0, 1], got {budget!r}")
        return int(float(budget) * int(length))
    raise InputError(f"{name}: expected an int count or a float ratio, got {type(budget).__name__}")


def resolve_head_budgets(
    budget: Any, heads: int, length: int, *, name: str = "budget"
) -> np.ndarray:
    """Per-head budgets int64 ``[heads]``: one budget (count or ratio) shared by every head,
    or a sequence of ``heads`` budgets."""
    if isinstance(budget, (list, tuple, np.ndarray)):
        vals = (
            list(np.asarray(budget).reshape(-1).tolist())
            if isinstance(budget, np.ndarray)
            else list(budget)
        )
        if len(vals) != heads:
            raise InputError(f"{name}: expected {heads} per-head budgets, got {len(vals)}")
        return np.array(
            [resolve_budget(v, length, name=f"{name}[{i}]") for i, v in enumerate(vals)],
            dtype=np.int64,
        )
    return np.full(heads, resolve_budget(budget, length, name=name), dtype=np.int64)
