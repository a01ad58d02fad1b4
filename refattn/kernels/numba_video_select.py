"""Numba CPU kernels of the video selection scores: PSA and PISA.

Each function takes exactly its reference op's arguments plus ``out=`` (a tuple of
preallocated outputs that it fills completely) and returns what the reference returns:

* ``psa_sampled_importance`` (:func:`refattn.video.psa.sampled_importance`): PSA's block
  importance ``P [B, Hq, Qb, Kb]`` from the sampled rows/columns. The sampled query rows
  (``[B, Hq, Qb*mq, D]``) and key columns (``[B, Hq, D, C]``, ``C`` = the sampled columns
  replicate-padded to a multiple of 64) are gathered once on the host (replicate padding of
  a partial block = index clamped to the last token; GQA: query head ``h`` reads kv head
  ``h // (Hq/Hkv)``). One ``prange`` task per (batch, head, query block) computes its
  ``mq x C`` logits by one float64 ``np.dot`` (BLAS, single-threaded while the kernel runs),
  the row maxima and the group maxima, then the normalised row of ``P``.
  ``dtype`` (``score_dtype``) rounds the stored maxima (log2 units), ``P``'s row sum and the
  quotient exactly as the reference does (float32, bf16 via float32 as ml_dtypes does, fp16
  directly from float64).
* ``psa_key_similarity`` (:func:`refattn.video.psa.key_similarity`): the mean cosine of the
  token pairs ``(2t, 2t+1)``, ``(4t, 4t+3)``, ``(8t, 8t+7)`` of every full key block,
  ``[3, ..., floor(L/block_k)]``; one task per (leading index, block).
* ``pisa_block_scores`` (:func:`refattn.video.pisa.pisa_block_scores`): block means rounded to
  the input dtype (one task per (batch, head, block)), the bias norms ``||Hc_j||_F`` (one task
  per (batch, kv head, key block); ``Hc_j`` accumulated from the centred keys, as the
  reference) and the scores ``qbar_i . (s kbar_j)`` with the optional softmax of
  ``score + ln(norm + 1e-5)`` over the key blocks (one task per (batch, head, query block)).

Numerics: inputs are converted once to float32 (exact for fp16, bf16 and fp32 inputs; fp64
inputs are rounded). Every product of two float32 values is exact in float64, and every dot
product (PSA: float64 dgemm on the float32-valued samples), sum, maximum, exponential and
softmax is accumulated in float64, so the kernels agree
with the float64 reference to a few float64 ulps before the final store, and the dtype
emulation (which rounds intermediate values) reproduces the reference's roundings. Outputs are
stored as float32 (or the float dtype of the caller's ``out=``). ``-inf`` enters only as the
start value of a maximum; no ``inf - inf`` or ``0 * inf`` is evaluated.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..core.registry import register
from ._blas import single_threaded_blas
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .numba_scoring_common import f32, kv_group, outputs

LOG2E = 1.4426950408889634        # PSA's log2(e) (the official kernel works in base 2)
PSA_COL_ALIGN = 64                # the official pooling kernel's key tile: sampled columns padded to it
PISA_BIAS_EPS = 1e-5              # PISA: ln(||Hc_j||_F + 1e-5)
KSIM_EPS = 1e-8                   # torch.cosine_similarity's eps on the product of the norms
KSIM_STEPS = (2, 4, 8)

# Rounding codes understood by the device helper ``_round_code``.
_ROUND_NONE, _ROUND_F32, _ROUND_BF16, _ROUND_F16 = 0, 1, 2, 3
_ROUND_CODES = {None: _ROUND_NONE, "float64": _ROUND_NONE, "float32": _ROUND_F32,
                "bfloat16": _ROUND_BF16, "float16": _ROUND_F16}


def _round_code(dtype: Any, name: str) -> int:
    key = None if dtype is None else str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if key not in _ROUND_CODES:
        raise InputError(f"{name}: expected one of None, 'float32', 'bfloat16', 'float16', "
                         f"'float64', got {dtype!r}")
    return _ROUND_CODES[key]


# --------------------------------------------------------------------------- device side
@njit(**NJIT_HELPER_OPTIONS)
def _round_bits(x: float, bits: int, emin: int, top: float) -> float:
    """``x`` rounded to nearest-even with ``bits`` significant bits, minimum normal exponent
    ``2**emin`` (fixed ulp below it: subnormals) and overflow to ``inf`` at ``top`` (the
    first power of two past the largest finite value)."""
    if x == 0.0 or not (abs(x) < np.inf):
        return x
    _, e = math.frexp(x)                               # |x| = m 2**e, m in [0.5, 1)
    e = max(e - 1, emin)                               # exponent of the leading bit
    ulp = math.ldexp(1.0, e - (bits - 1))
    r = np.rint(x / ulp) * ulp                         # exact: ulp is a power of two
    if abs(r) >= top:
        return math.copysign(np.inf, x)
    return r


@njit(**NJIT_HELPER_OPTIONS)
def _round_to(x: float, code: int) -> float:
    """``x`` rounded to the storage dtype of ``code`` and returned as float64, as
    ``refattn.video.psa._round`` / ``refattn.video.pisa._in_dtype`` do."""
    if code == _ROUND_NONE:
        return x
    f = np.float64(np.float32(x))                     # float64 -> float32, nearest-even
    if code == _ROUND_F32:
        return f
    if code == _ROUND_BF16:                            # ml_dtypes: via float32 (double rounding)
        return _round_bits(f, 8, -126, 2.0 ** 128)
    return _round_bits(x, 11, -14, 65536.0)            # NumPy's float64 -> float16: one rounding


@njit(**NJIT_OPTIONS)
def _psa_importance(qs, kcT, mq, mk, nk, code, P):
    """qs float64 ``[B, Hq, Qb*mq, D]`` (sampled rows), kcT float64 ``[B, Hq, D, C]``
    (sampled, 64-aligned columns, transposed) -> P ``[B, Hq, Qb, nk]``."""
    B, Hq, _, D = qs.shape
    C = kcT.shape[3]
    Qb = P.shape[2]
    nb = (C + mk - 1) // mk                            # column groups incl. the pseudo blocks
    rd = math.sqrt(D)
    for task in prange(B * Hq * Qb):
        b = task // (Hq * Qb)
        h = (task // Qb) % Hq
        i = task % Qb
        x = np.dot(qs[b, h, i * mq:(i + 1) * mq], kcT[b, h])      # [mq, C] float64 (dgemm)
        bmax = np.full((mq, nb), -np.inf)
        mrow = np.full(mq, -np.inf)
        for r in range(mq):
            for c in range(C):
                xv = x[r, c] / rd
                g = c // mk
                if xv > bmax[r, g]:
                    bmax[r, g] = xv
                if xv > mrow[r]:
                    mrow[r] = xv
        pool = np.empty(nb)
        for g in range(nb):
            best = 0.0                                 # every term is > 0
            for r in range(mq):
                if code == _ROUND_NONE:
                    e = math.exp(bmax[r, g] - mrow[r])
                else:
                    e = np.exp2(_round_to(bmax[r, g] * LOG2E, code) - mrow[r] * LOG2E)
                best = max(best, e)
            pool[g] = _round_to(best, code)
        tot = 0.0
        for g in range(nb):
            tot += pool[g]
        tot = _round_to(tot, code)
        for j in range(nk):
            P[b, h, i, j] = _round_to(pool[j] / tot, code)


@njit(**NJIT_OPTIONS)
def _key_similarity(k, bk, sim):
    """k float32 ``[N, L, D]`` -> sim ``[3, N, floor(L/bk)]``."""
    N, _, D = k.shape
    n = sim.shape[2]
    for task in prange(N * n):
        a0 = task // n
        j = task % n
        base = j * bk
        for si in range(3):
            step = 2 << si                             # 2, 4, 8
            npair = bk // step
            tot = 0.0
            for t in range(npair):
                ra = k[a0, base + t * step]
                rc = k[a0, base + t * step + step - 1]
                dot = 0.0
                na = 0.0
                nc = 0.0
                for d in range(D):
                    xa = np.float64(ra[d])
                    xc = np.float64(rc[d])
                    dot += xa * xc
                    na += xa * xa
                    nc += xc * xc
                tot += dot / max(math.sqrt(na) * math.sqrt(nc), KSIM_EPS)
            sim[si, a0, j] = tot / npair


@njit(**NJIT_OPTIONS)
def _block_means(x, bs, code, mean):
    """x float32 ``[B, H, S, D]`` -> mean float64 ``[B, H, ceil(S/bs), D]`` over each block's
    true length, rounded to the storage dtype ``code``."""
    B, H, S, D = x.shape
    n = mean.shape[2]
    for task in prange(B * H * n):
        b = task // (H * n)
        h = (task // n) % H
        j = task % n
        r0 = j * bs
        r1 = min(S, r0 + bs)
        acc = np.zeros(D)
        for t in range(r0, r1):
            row = x[b, h, t]
            for d in range(D):
                acc[d] += row[d]
        for d in range(D):
            mean[b, h, j, d] = _round_to(acc[d] / (r1 - r0), code)


@njit(**NJIT_OPTIONS)
def _bias_norms(k, v, bs, norms):
    """||Hc_j||_F with Hc_j = sum_{u in j} (k_u - kbar_j) v_u^T; k ``[B, H, S, D]``,
    v ``[B, H, S, Dv]`` float32 -> norms float64 ``[B, H, ceil(S/bs)]``."""
    B, H, S, D = k.shape
    Dv = v.shape[3]
    n = norms.shape[2]
    for task in prange(B * H * n):
        b = task // (H * n)
        h = (task // n) % H
        j = task % n
        r0 = j * bs
        r1 = min(S, r0 + bs)
        kbar = np.zeros(D)
        for t in range(r0, r1):
            for d in range(D):
                kbar[d] += k[b, h, t, d]
        for d in range(D):
            kbar[d] /= r1 - r0
        hc = np.zeros((D, Dv))
        cen = np.empty(D)
        for t in range(r0, r1):
            for d in range(D):
                cen[d] = k[b, h, t, d] - kbar[d]
            vr = v[b, h, t]
            for d in range(D):
                c = cen[d]
                for e in range(Dv):
                    hc[d, e] += c * np.float64(vr[e])
        acc = 0.0
        for d in range(D):
            for e in range(Dv):
                acc += hc[d, e] * hc[d, e]
        norms[b, h, j] = math.sqrt(acc)


@njit(**NJIT_OPTIONS)
def _pisa_scores(qbar, kbar, scale, group, use_bias, norms, sc):
    """qbar ``[B, Hq, Qb, D]``, kbar ``[B, Hkv, Kb, D]`` (float64, rounded), norms
    ``[B, Hkv, Kb]`` (read with ``use_bias``) -> sc ``[B, Hq, Qb, Kb]``."""
    B, Hq, Qb, D = qbar.shape
    Kb = kbar.shape[2]
    for task in prange(B * Hq * Qb):
        b = task // (Hq * Qb)
        h = (task // Qb) % Hq
        i = task % Qb
        g = h // group
        z = np.empty(Kb)
        mx = -np.inf
        for j in range(Kb):
            acc = 0.0
            for d in range(D):
                acc += qbar[b, h, i, d] * (scale * kbar[b, g, j, d])
            if use_bias:
                acc += math.log(norms[b, g, j] + PISA_BIAS_EPS)
            z[j] = acc
            mx = max(mx, acc)
        if not use_bias:
            for j in range(Kb):
                sc[b, h, i, j] = z[j]
            continue
        den = 0.0
        for j in range(Kb):
            z[j] = math.exp(z[j] - mx)
            den += z[j]
        for j in range(Kb):
            sc[b, h, i, j] = z[j] / den


# ----------------------------------------------------------------------------- host side
def _positive_int(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 1:
        raise InputError(f"{name}: expected an integer >= 1, got {x!r}")
    return int(x)


def _offsets(off: Any, B: int, Hq: int, block: int, name: str) -> np.ndarray:
    o = np.asarray(off)
    if o.dtype.kind not in "iu" or o.ndim not in (1, 3) or o.shape[-1] < 1 \
            or (o.ndim == 3 and o.shape[:2] != (B, Hq)) or (o < 0).any() or (o >= block).any():
        raise InputError(f"{name}: expected integer offsets in [0, {block}), shape [m] or "
                         f"[B={B}, Hq={Hq}, m], got {o.dtype} {o.shape}")
    return np.ascontiguousarray(np.broadcast_to(o.astype(np.int64), (B, Hq, o.shape[-1])))


@register("psa_sampled_importance", "numba")
def psa_sampled_importance_numba(q: Any, k: Any, block_q: int, block_k: int, offsets_q: Any,
                                 offsets_k: Any, dtype: str | None = None, *,
                                 out: Any = None) -> np.ndarray:
    """Numba :func:`refattn.video.psa.sampled_importance` (same arguments, ``out=``).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, offsets int ``[m]`` or ``[B, Hq, m]``;
    returns P ``[B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)]`` (float32 unless ``out=``)."""
    q32, k32 = f32(q, "q"), f32(k, "k")
    G = kv_group(q32, k32)
    bq, bk = _positive_int(block_q, "block_q"), _positive_int(block_k, "block_k")
    code = _round_code(dtype, "dtype")
    B, Hq, Sq, D = q32.shape
    Sk = k32.shape[2]
    if Sq == 0 or Sk == 0:
        raise InputError(f"q, k: empty sequence (q_len {Sq}, k_len {Sk})")
    offq = _offsets(offsets_q, B, Hq, bq, "offsets_q")
    offk = _offsets(offsets_k, B, Hq, bk, "offsets_k")
    mq, mk = offq.shape[2], offk.shape[2]
    nq, nk = num_blocks(Sq, bq), num_blocks(Sk, bk)
    (P,) = outputs(out, ((B, Hq, nq, nk),), "psa_sampled_importance")
    # sampled rows / columns of the replicate-padded sequences (padding = the last token)
    rows = np.minimum(np.arange(nq)[None, None, :, None] * bq + offq[:, :, None, :], Sq - 1)
    cols = (np.arange(nk)[None, None, :, None] * bk + offk[:, :, None, :]).reshape(B, Hq, nk * mk)
    pad = -cols.shape[2] % PSA_COL_ALIGN
    if pad:
        cols = np.concatenate([cols, np.repeat(cols[:, :, -1:], pad, axis=2)], axis=2)
    cols = np.minimum(cols, Sk - 1)
    bi = np.arange(B)[:, None, None]
    hi = np.arange(Hq)[None, :, None]
    # float64 copies of float32 values: every product is exact, dgemm accumulates in float64
    qs = np.ascontiguousarray(q32[bi, hi, rows.reshape(B, Hq, nq * mq)], np.float64)
    kcT = np.ascontiguousarray(k32[bi, hi // G, cols].transpose(0, 1, 3, 2), np.float64)
    with single_threaded_blas():
        _psa_importance(qs, kcT, mq, mk, nk, code, P)
    return P


@register("psa_key_similarity", "numba")
def psa_key_similarity_numba(k: Any, block_k: int, *, out: Any = None) -> np.ndarray:
    """Numba :func:`refattn.video.psa.key_similarity` (same arguments, ``out=``).

    k ``[..., L, D]``; returns sim ``[3, ..., floor(L/block_k)]`` (float32 unless ``out=``).
    ``block_k`` must be a multiple of 8 (the pairs ``(8t, 8t+7)`` tile the block)."""
    a = np.asarray(k)
    if a.ndim < 2:
        raise InputError(f"k: expected an array [..., L, D], got shape {a.shape}")
    bk = _positive_int(block_k, "block_k")
    if bk % 8:
        raise InputError(f"block_k: the key-similarity pairs (2t,2t+1), (4t,4t+3), (8t,8t+7) "
                         f"need a multiple of 8, got {bk}")
    lead, (L, D) = a.shape[:-2], a.shape[-2:]
    k32 = f32(a.reshape((1, -1, L, D)), "k")[0]
    n = L // bk
    (sim,) = outputs(out, ((3,) + lead + (n,),), "psa_key_similarity")
    flat = np.empty((3, k32.shape[0], n), sim.dtype)
    _key_similarity(k32, bk, flat)
    sim[...] = flat.reshape(sim.shape)
    return sim


@register("pisa_block_scores", "numba")
def pisa_block_scores_numba(q: Any, k: Any, v: Any, block_size: int, use_bias: bool = False,
                            scale: float | None = None, *,
                            out: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Numba :func:`refattn.video.pisa.pisa_block_scores` (same arguments, ``out=``).

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D|Dv]``; returns scores ``[B, Hq, Qb, Kb]`` and
    bias_norm ``[B, Hkv, Kb]`` (``[B, Hkv, 0]`` without ``use_bias``), float32 unless ``out=``.
    The block means are rounded to the dtype of q (resp. k) as the reference does."""
    qa, ka = np.asarray(q), np.asarray(k)
    cq, ck = _round_code(qa.dtype, "q"), _round_code(ka.dtype, "k")
    q32, k32 = f32(qa, "q"), f32(ka, "k")
    G = kv_group(q32, k32)
    bs = _positive_int(block_size, "block_size")
    B, Hq, Sq, D = q32.shape
    Hkv, Sk = k32.shape[1], k32.shape[2]
    if Sq == 0 or Sk == 0:
        raise InputError(f"q, k: empty sequence (q_len {Sq}, k_len {Sk})")
    s = D ** -0.5 if scale is None else float(scale)
    bias = bool(use_bias)
    qb, kb = num_blocks(Sq, bs), num_blocks(Sk, bs)
    sc, nrm = outputs(out, ((B, Hq, qb, kb), (B, Hkv, kb if bias else 0)), "pisa_block_scores")
    norms = np.zeros((B, Hkv, kb))
    if bias:
        if v is None:
            raise InputError("v: PISA with use_bias=True needs v (the bias uses K^T V moments)")
        v32 = f32(v, "v")
        if v32.shape[:3] != (B, Hkv, Sk):
            raise InputError(f"v: expected shape [{B}, {Hkv}, {Sk}, Dv], got {v32.shape}")
        _bias_norms(k32, v32, bs, norms)
        nrm[...] = norms
    qbar, kbar = np.empty((B, Hq, qb, D)), np.empty((B, Hkv, kb, D))
    _block_means(q32, bs, cq, qbar)
    _block_means(k32, bs, ck, kbar)
    _pisa_scores(qbar, kbar, s, G, bias, norms, sc)
    return sc, nrm
