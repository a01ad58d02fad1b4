"""Evaluation of methods' selections against dense attention, with baselines of the same
budget (used by ``refattn eval`` and ``refattn demo``)."""
from __future__ import annotations

import sys
import time
import zlib
from typing import Any, Callable

import click
import numpy as np

from .api import attention, attention_mask_of, select
from .core.blockmask import BlockMask, legal_blocks
from .core.errors import InputError
from .reference.attention import attention_forward
from .reference.metrics import evaluate
from .reference.selection import diagonal_blocks


def baseline_masks(mask: BlockMask, num_q_heads: int, batch: int, causal: bool,
                   seed: int) -> dict[str, BlockMask]:
    """Two baselines with ``mask``'s per-row budget (selected legal blocks per row, per
    head): ``random`` (that many legal blocks, uniformly at random, seeded) and
    ``causal-window`` (the band of that many legal blocks nearest the diagonal block)."""
    m = mask.expand_heads(num_q_heads)
    legal = legal_blocks(m.q_len, m.k_len, m.block_q, m.block_k, causal)
    full = np.broadcast_to(m.mask, (batch, num_q_heads) + m.mask.shape[2:]) & legal
    count = full.sum(-1, keepdims=True)
    rng = np.random.default_rng(seed)

    def take(key: np.ndarray) -> np.ndarray:  # the `count` legal blocks of smallest key
        key = np.where(legal, key, np.inf)
        rank = np.argsort(np.argsort(key, axis=-1, kind="stable"), axis=-1, kind="stable")
        return (rank < count) & legal

    diag = diagonal_blocks(m.q_len, m.k_len, m.block_q, m.block_k)[:, None]
    cols = np.arange(m.num_k_blocks)[None, :]
    window = (2.0 * np.abs(cols - diag) + (cols > diag)).astype(np.float64)
    return {"random": m.like(take(rng.random(full.shape))),
            "causal-window": m.like(take(np.broadcast_to(window, full.shape)))}


def rows_of(label: str, ev: Any, per_head: bool, baseline_for: str | None) -> list[dict[str, Any]]:
    o = ev.overall
    rows = [{"method": label, "baseline_for": baseline_for, "head": "all",
             "density": o["density"], "recall": o["recall"], "output_error": o["output_error"],
             "flops_saved": o["flops_saved"],
             "recall_by_head": [round(float(x), 4) for x in ev.recall.reshape(-1)]}]
    if per_head:
        B, H = ev.density.shape
        for b in range(B):
            for h in range(H):
                rows.append({"method": label, "baseline_for": baseline_for,
                             "head": h if B == 1 else f"{b}/{h}",
                             "density": float(ev.density[b, h]), "recall": float(ev.recall[b, h]),
                             "output_error": float(ev.output_error[b, h]),
                             "flops_saved": float(1 - ev.masked_flops[b, h] / max(ev.dense_flops, 1))})
    return rows


def evaluate_methods(q: np.ndarray, k: np.ndarray, v: np.ndarray, names: list[str],
                      params: dict[str, dict[str, Any]], causal: bool, scale: float, *,
                      per_head: bool, seed: int, baselines: bool = True, backend: str = "numpy",
                      progress: bool = False, budget_s: float | None = None,
                      catch: tuple[type[BaseException], ...] = (InputError,),
                      extra: dict[str, BlockMask] | None = None,
                      wrap: Callable[[Callable[[], Any]], Any] = lambda f: f()
                      ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows of density/recall/error/FLOPs for each named method (plus its two baselines
    when ``baselines``) and for the ``extra`` masks, sharing one dense pass; and the
    skipped methods with the reason (errors of the types in ``catch``, time budget).
    ``wrap`` runs each selection (the CLI passes one that echoes warnings)."""
    dense = attention_forward(q, k, v, None, causal, scale)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for label, m in (extra or {}).items():
        rows += rows_of(label, evaluate(q, k, v, m, causal, scale, dense=dense), per_head, None)
    start = time.monotonic()

    def run(name: str) -> None:
        if budget_s is not None and time.monotonic() - start > budget_s:
            skipped.append({"method": name, "reason": f"time budget of {budget_s:.0f} s spent"})
            return
        try:
            sel = wrap(lambda: select(q, k, name, v=v, causal=causal, backend=backend,
                                      **params.get(name, {})))
        except catch as e:
            skipped.append({"method": name, "reason": f"{type(e).__name__}: {e}"})
            return
        own = None
        if sel.extras.get("attention"):  # the method's own attention (pyramid, piecewise)
            own = attention(q, k, v, mask=sel, causal=causal, softmax_scale=scale, backend=backend)
        ev = evaluate(q, k, v, attention_mask_of(sel), causal, scale, dense=dense, out=own)
        rows.extend(rows_of(name, ev, per_head, None))
        if not baselines:
            return
        base = baseline_masks(sel.mask, q.shape[1], q.shape[0], causal,
                              seed=zlib.crc32(f"{seed}:{name}".encode()))
        for bname, bm in base.items():
            rows.extend(rows_of(f"{bname}@{name}", evaluate(q, k, v, bm, causal, scale, dense=dense),
                              per_head, name))

    if progress and len(names) > 1:
        with click.progressbar(names, label="evaluating", file=sys.stderr) as bar:
            for name in bar:
                run(name)
    else:
        for name in names:
            run(name)
    return rows, skipped
