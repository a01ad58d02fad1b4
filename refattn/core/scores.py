"""``BlockScores`` and ``Selection``: what a scoring rule computes and what a selection returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blockmask import BlockMask, num_blocks
from .errors import InputError
from .layout import is_device_array as _on_device
from .layout import to_host as _host


@dataclass(frozen=True, eq=False)
class BlockScores:
    """Block importance scores, float64 ``[B, H, Qb, Kb]``, on a block grid.

    ``head_kind`` says whether H counts query heads (``"q"``) or kv heads (``"kv"``).
    Blocks a rule never scores (future blocks, padding) hold ``-inf`` or ``nan`` as the
    method documents.
    """

    scores: np.ndarray
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    head_kind: str = "q"

    def __post_init__(self) -> None:
        s = self.scores
        if _on_device(s):          # device scores stay CuPy (float64)
            s = s.astype("float64", copy=False)
        else:
            s = np.asarray(s, dtype=np.float64)
        while s.ndim < 4:
            s = s[None]
        if s.ndim != 4:
            raise InputError(f"BlockScores: expected a [B, H, Qb, Kb] array, got shape {s.shape}")
        qb, kb = num_blocks(self.q_len, self.block_q), num_blocks(self.k_len, self.block_k)
        if s.shape[2:] != (qb, kb):
            raise InputError(f"BlockScores: scores have {s.shape[2:]} blocks, geometry gives ({qb}, {kb})")
        object.__setattr__(self, "scores", s)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.scores.shape

    def to_host(self) -> "BlockScores":
        """The same scores as a NumPy array (``self`` when already on the host)."""
        if not _on_device(self.scores):
            return self
        return BlockScores(self.scores.get(), self.block_q, self.block_k, self.q_len,
                           self.k_len, self.head_kind)

    def to_mask(self, mask: Any) -> BlockMask:
        """A :class:`BlockMask` on this grid."""
        return BlockMask(mask, block_q=self.block_q, block_k=self.block_k, q_len=self.q_len,
                         k_len=self.k_len, head_kind=self.head_kind)


@dataclass(eq=False)
class Selection:
    """The result of a selection rule.

    * ``mask``: the selected blocks (:class:`BlockMask`).
    * ``scores``: the scores the rule ranked (:class:`BlockScores`, or ``None``), the values
      against which ``boundary`` is stated.
    * ``boundary``: the score at the selection boundary, per row ``[B, H, Qb]`` (top-k per
      row, cumulative threshold per row) or per head ``[B, H]`` (global rules): the k-th
      selected score, or the score of the block at which the threshold was crossed. ``nan``
      where a row selected nothing by score. A comparison of two masks uses it to tell a real
      mismatch from a near-tie flipped by rounding.
    * ``forced``: blocks set regardless of score (sinks, diagonals), bool like ``mask`` or None.
    * ``extras``: method-specific results (``perm``, ``vertical``, ``slash``, ``budgets``,
      ``pattern``, ...).
    """

    mask: BlockMask
    scores: BlockScores | None = None
    boundary: np.ndarray | None = None
    forced: np.ndarray | None = None
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def on_device(self) -> bool:
        """True when the mask lives on the GPU (a device selection, see
        :func:`refattn.api.select`)."""
        return self.mask.on_device

    def to_host(self) -> "Selection":
        """A copy with every array on the host (``self`` when nothing is on the device)."""
        arrays = [self.boundary, self.forced] + list(self.extras.values())
        if not self.on_device and not any(_on_device(a) for a in arrays) and (
                self.scores is None or not _on_device(self.scores.scores)):
            return self
        return Selection(mask=self.mask.to_host(),
                         scores=None if self.scores is None else self.scores.to_host(),
                         boundary=_host(self.boundary), forced=_host(self.forced),
                         method=self.method, params=dict(self.params),
                         extras={k: _host(v) for k, v in self.extras.items()})

    def boundary_like_mask(self) -> np.ndarray | None:
        """``boundary`` broadcastable against ``[B, H, Qb, Kb]`` (host array)."""
        if self.boundary is None:
            return None
        b = np.asarray(_host(self.boundary), dtype=np.float64)
        if b.ndim == 3:
            return b[..., None]
        if b.ndim == 2:
            return b[..., None, None]
        if b.ndim == 4:
            return b
        raise InputError(f"Selection.boundary: expected [B,H,Qb] or [B,H], got shape {b.shape}")
