"""CuPy launchers for the scoring ops of NSA, ProxyAttn and PBS-Attn (backend ``"cupy"``).

Registered ops, each with the signature, outputs and semantics of its NumPy reference:

* ``nsa_score(q, k, compress_size, stride, block_size, causal, *, out=None)`` ->
  ``(p_slc [B, Hkv, Sq, Kb], p_cmp [B, Hq, Sq, Nc])`` (``refattn.methods.nsa.nsa_scores``);
* ``proxyattn_score(q, k, block_size, group_size, stride, causal, *, out=None)`` ->
  ``(S [B, Hq/group_size, Qb, Kb],)`` (``refattn.methods.proxyattn.proxyattn_proxy_scores``);
* ``proxyattn_budget_score(q, k, block_size, causal, *, out=None)`` ->
  ``(a [B, Hq, Kb],)`` (``proxyattn_budget_scores``);
* ``pbs_key_importance(q, k, block_size, segment_size, *, out=None)`` ->
  ``(w [B, Hq, floor(L/s)*s],)`` (``refattn.methods.pbs.pbs_key_importance``);
* ``pbs_score(q, k_perm, block_size, segment_size, *, out=None)`` -> ``(p [B, Hq, n, n],)``
  with NaN rows where the reference has them (``pbs_block_scores``).

Inputs, outputs and precision follow ``gpu/scoring.py``: canonical ``bhsd`` NumPy or CuPy
arrays (anything :func:`refattn.core.layout.as_array` accepts), bf16/fp16/fp32/fp64, GQA;
NumPy in gives NumPy out, device in gives CuPy out; ``out=`` takes NumPy or CuPy
float32/float64 arrays. fp32/fp64 inputs are computed in float64 (results float64);
bf16/fp16 inputs return float32 and, for the token-level products (NSA's compressed
attention, ProxyAttn's strided proxy attention and its last-block budget attention, PBS's key
importance) with D in {64, 128} on sm_80+, run on tensor cores (``gpu/score_nsa.cu``,
``gpu/score_proxy_pbs.cu``) with fp32 accumulation and softmax.
Float64 operands of the reference that feed a tensor-core product (NSA's pooled keys,
ProxyAttn's head-pooled q/k) are split into two 16-bit parts (hi + lo), so the products keep
about 16 mantissa bits instead of bf16's 8. The pooled block product of ``pbs_score`` is
small (``(S/b)^2 D`` per head) and runs in float64 for every dtype. See ``docs/gpu.md``
("Compressed and proxy scoring kernels") for the kernels and their speed.
"""
from __future__ import annotations

import math
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.errors import InputError
from refattn.core.registry import register

from ._build import get_kernel, launch, tensor_cores_available
from ._scoring_common import _CT, _cdiv, _deliver, _positive, _qk

_SRC_NSA = "score_nsa.cu"
_SRC_PX = "score_proxy_pbs.cu"
_SRC_POOL = "score_compressed_pool.cu"
_I32, _I64, _F32, _F64 = np.int32, np.int64, np.float32, np.float64
_LOG2E = 1.4426950408889634

#: Split NSA's pooled keys into hi + lo 16-bit parts on the tensor-core path (the logits then
#: match the float64 reference to ~1e-5 relative; False rounds them to the input dtype, which
#: costs half the tensor-core work and ~bf16 accuracy in the logits).
NSA_SPLIT = True
#: NSA tensor-core kernel: "v1" (`nsa_tc`: eq. 9 spread through shared-memory atomics into a
#: ring of per-row block bins; any geometry) or "v2" (`nsa_tc2`: the spread as a fixed map
#: formed in registers with quad shuffles, no atomics; only for l = 2d, l' = 4d, e.g. the
#: defaults 32/16/64 -- other geometries keep v1). See docs/gpu_notes.md, "NSA scoring".
#: v2 is the default since the H200 probe (scripts/probe_nsa.py): same outputs as v1 within
#: 2e-7, 2.7x faster (p_slc at 32k: 15.5 -> 5.8 ms).
NSA_KERNEL = "v2"
#: Bound on ProxyAttn's scratch (per kept row and key block: the max logit) of one launch;
#: proxy heads are processed in groups that fit.
PROXY_SCRATCH_BYTES = 1 << 30
#: 64-key tiles per CTA of the PBS key-importance kernels (the key axis is split over CTAs).
PBS_KI_TILES_PER_SPLIT = 16
#: 64-key tiles per CTA of ProxyAttn's budget kernels (the key axis is split over CTAs).
PROXY_BUDGET_TILES_PER_SPLIT = 16
#: Largest number of kept rows (block_size / stride) per ProxyAttn query block on the
#: tensor-core path.
PROXY_MAX_ROWS = 4096


def _lowp(kind: str) -> bool:
    return kind in ("bfloat16", "float16")


def _tc(kind: str, D: int) -> bool:
    """Tensor-core path possible: bf16/fp16, D in {64, 128}, sm_80+."""
    return _lowp(kind) and D in (64, 128) and tensor_cores_available()


def _eng_smem(D: int) -> int:
    """Dynamic shared memory of the QK^T engine: 128 Q rows + 2 x 64 K rows, padded."""
    return (128 + 2 * 64) * (D + 8) * 2


def _finish(x: Any, kind: str) -> Any:
    """float64 results of the float64 kernels: float32 for bf16/fp16 inputs."""
    return x.astype(cp.float32) if _lowp(kind) else x


# ----------------------------------------------------------------------------------- NSA
def _nsa_win(kpt: int, pc: int, ps: int) -> int | None:
    """Ring size (blocks per row) of the NSA bins: live blocks <= (kpt - 2 + pc)//ps + 2."""
    need = (kpt - 2 + pc) // ps + 2
    for w in (32, 64, 128):
        if need <= w:
            return w
    return None


def _nsa_v2(pc: int, ps: int) -> bool:
    """The v2 kernel is selected and takes this geometry (l/d = 2, l'/d = 4)."""
    if NSA_KERNEL not in ("v1", "v2"):
        raise InputError(f"scoring_compressed.NSA_KERNEL: 'v1' or 'v2', got {NSA_KERNEL!r}")
    return NSA_KERNEL == "v2" and pc == 2 and ps == 4


def nsa_kernel_used(kind: str, D: int, compress_size: int, stride: int, block_size: int) -> str:
    """Which NSA kernel ``nsa_score`` runs for this input: "v2", "v1" (tensor cores) or
    "exact" (float64)."""
    if not nsa_fast_path(kind, D, compress_size, stride, block_size):
        return "exact"
    return "v2" if _nsa_v2(compress_size // stride, block_size // stride) else "v1"


def nsa_fast_path(kind: str, D: int, compress_size: int, stride: int, block_size: int) -> bool:
    """True when ``nsa_score`` runs on tensor cores (bf16/fp16, D in {64, 128}, sm_80+, and
    the selection blocks touched by one key tile fit the bin ring: (kpt - 2 + l/d)//(l'/d)
    + 2 <= 128)."""
    kpt = 32 if NSA_SPLIT else 64
    return (_tc(kind, D) and _nsa_win(kpt, compress_size // stride, block_size // stride) is not None)


def _nsa(q: Any, k: Any, compress_size: int, stride: int, block_size: int, causal: bool,
         want_cmp: bool) -> tuple[Any, Any, bool, str]:
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "nsa_score")
    cl, cd, lp = (_positive("compress_size", compress_size), _positive("stride", stride),
                  _positive("block_size", block_size))
    if cl % cd or lp % cd:
        raise InputError(f"nsa_score: stride {cd} must divide compress_size {cl} and "
                         f"block_size {lp}")
    nc = (Sk - cl) // cd + 1 if Sk >= cl else 0
    kb = _cdiv(Sk, lp)
    pc, ps = cl // cd, lp // cd
    G = Hq // Hkv
    ct = _CT[kind]
    scale = 1.0 / math.sqrt(D)
    causal = bool(causal)
    if nsa_fast_path(kind, D, cl, cd, lp):
        ks = 1 if NSA_SPLIT else 0
        win = _nsa_win(64 >> ks, pc, ps)
        kc = cp.empty((B, Hkv, max(nc, 1), D << ks), cp.uint16)
        if nc:
            launch(get_kernel(_SRC_POOL, f"win_mean<{ct}, {ct}>"), (nc, B * Hkv), (128,),
                   (kd, kc, _I32(Sk), _I32(D), _I32(cl), _I32(cd), _I32(nc), _I32(0), _I32(ks)))
        p_slc = cp.empty((B, Hkv, Sq, kb), cp.float32)
        p_cmp = cp.empty((B, Hq, Sq, nc), cp.float32) if want_cmp else cp.empty((1,), cp.float32)
        if _nsa_v2(pc, ps):
            launch(get_kernel(_SRC_NSA, f"nsa_tc2<{ct}, {D}, {ks}>"), (_cdiv(Sq, 128), Hkv, B),
                   (128,),
                   (qd, kc, p_slc, p_cmp, _I32(bool(want_cmp)), _I32(Hq), _I32(G), _I32(Sq),
                    _I32(Sk), _I32(nc), _I32(kb), _I32(cl), _I32(cd), _F32(scale * _LOG2E),
                    _I32(causal)),
                   shared_mem=_eng_smem(D))
            return p_slc, (p_cmp if want_cmp else None), host, kind
        fn = get_kernel(_SRC_NSA, f"nsa_tc<{ct}, {D}, {ks}, {win}>")
        launch(fn, (_cdiv(Sq, 128), Hkv, B), (128,),
               (qd, kc, p_slc, p_cmp, _I32(bool(want_cmp)), _I32(Hq), _I32(G), _I32(Sq), _I32(Sk),
                _I32(nc), _I32(kb), _I32(cl), _I32(cd), _I32(pc), _I32(ps),
                _F32(scale * _LOG2E), _I32(causal)),
               shared_mem=_eng_smem(D) + 128 * (win + 1) * 4)
        return p_slc, (p_cmp if want_cmp else None), host, kind
    kcd = cp.empty((B, Hkv, max(nc, 1), D), cp.float64)
    if nc:
        launch(get_kernel(_SRC_POOL, f"win_mean<{ct}, double>"), (nc, B * Hkv), (128,),
               (kd, kcd, _I32(Sk), _I32(D), _I32(cl), _I32(cd), _I32(nc), _I32(0), _I32(0)))
    p_slc = cp.empty((B, Hkv, Sq, kb), cp.float64)
    p_cmp = cp.empty((B, Hq, Sq, nc), cp.float64)
    launch(get_kernel(_SRC_NSA, f"nsa_exact<{ct}>"), (_cdiv(Sq, 4), Hkv, B), (128,),
           (qd, kcd, p_slc, p_cmp, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D), _I32(nc),
            _I32(kb), _I32(cl), _I32(cd), _I32(pc), _I32(ps), _F64(scale), _I32(causal)),
           shared_mem=4 * D * 8)
    return _finish(p_slc, kind), (_finish(p_cmp, kind) if want_cmp else None), host, kind


@register("nsa_score", "cupy")
def nsa_score(q: Any, k: Any, compress_size: int, stride: int, block_size: int, causal: bool,
              *, out: Any = None) -> tuple[Any, Any]:
    """NSA selection-block importance with mean-pooled compression (reference
    ``refattn.methods.nsa.nsa_scores``).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``. Returns ``p_slc [B, Hkv, Sq, Kb]`` (eq. 9
    spread of the compressed attention, summed over each GQA group, ``Kb = ceil(Sk / l')``)
    and ``p_cmp [B, Hq, Sq, Nc]`` (compressed attention; 0 on blocks a row has not fully
    seen when ``causal``), ``Nc = floor((Sk - l)/d) + 1`` (0 when ``Sk < l``).
    """
    p_slc, p_cmp, host, _ = _nsa(q, k, compress_size, stride, block_size, causal, True)
    return _deliver((p_slc, p_cmp), out, host, ("p_slc", "p_cmp"))


def nsa_block_scores(q: Any, k: Any, compress_size: int, stride: int, block_size: int,
                     causal: bool) -> Any:
    """``p_slc`` of :func:`nsa_score` alone (the selection needs only it): the tensor-core
    kernel then skips writing ``p_cmp``, which is ``l'/d`` times larger (4x at the
    defaults) and dominates the op's memory traffic. NumPy in -> NumPy out."""
    p_slc, _, host, _ = _nsa(q, k, compress_size, stride, block_size, causal, False)
    return p_slc.get() if host else p_slc


# ----------------------------------------------------------------------------- ProxyAttn
def _proxy_bpt(nb: int, kpt: int) -> int | None:
    """Key blocks per tile for blocks of ``nb`` kept keys (1 when a block spans whole tiles),
    None if neither divides or a block is narrower than one n8 group."""
    if nb % kpt == 0:
        return 1
    if kpt % nb == 0 and nb >= 8:
        return kpt // nb
    return None


def _proxy_group(Hq: int, Hkv: int, gs: int) -> int:
    """The GQA group ``G``; ``gs`` must be a multiple of it dividing ``Hq``."""
    G = Hq // Hkv
    if Hq % gs or gs % G:
        raise InputError(f"proxyattn_score: group_size must be a multiple of the GQA group "
                         f"({G}) dividing Hq={Hq}, got {gs}")
    return G


def proxyattn_fast_path(kind: str, D: int, block_size: int, group_size: int, stride: int,
                        Hq: int, Hkv: int) -> bool:
    """True when ``proxyattn_score`` runs on tensor cores: bf16/fp16, D in {64, 128},
    sm_80+, ``stride`` dividing ``block_size`` and the ``block_size / stride`` kept keys of
    a block a multiple of the key tile (64 kept keys, or 32 when the proxy keys pool several
    kv heads) or one of 8/16/32 dividing it, at most PROXY_MAX_ROWS of them."""
    if block_size % stride:
        return False
    nb = block_size // stride
    kpt = 32 if group_size // max(1, Hq // Hkv) > 1 else 64
    return _tc(kind, D) and _proxy_bpt(nb, kpt) is not None and nb <= PROXY_MAX_ROWS


@register("proxyattn_score", "cupy")
def proxyattn_score(q: Any, k: Any, block_size: int, group_size: int, stride: int,
                    causal: bool, *, out: Any = None) -> tuple[Any]:
    """ProxyAttn proxy block scores (reference
    ``refattn.methods.proxyattn.proxyattn_proxy_scores``).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; ``group_size`` ``g`` a multiple of
    ``Hq // Hkv`` dividing ``Hq``. Proxy head ``c`` is the mean of query heads
    ``[c*g, (c+1)*g)`` and of the kv heads they read, at the kept rows and keys (multiples
    of ``stride``); ``S[b, c, I, J]`` is the max over the kept rows of query block ``I`` and
    the kept keys of key block ``J`` of the proxy head's causal softmax over the kept keys
    (0 where no kept pair is visible). Returns ``(S,)`` ``[B, Hq/g, Qb, Kb]``.
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "proxyattn_score")
    bs, gs, st = (_positive("block_size", block_size), _positive("group_size", group_size),
                  _positive("stride", stride))
    G = _proxy_group(Hq, Hkv, gs)
    C = Hq // gs
    Qb, Kb = _cdiv(Sq, bs), _cdiv(Sk, bs)
    nrow, nkey = _cdiv(Sq, st), _cdiv(Sk, st)        # kept rows u*st, kept keys v*st
    ct = _CT[kind]
    scale = 1.0 / math.sqrt(D)
    causal = bool(causal)
    if proxyattn_fast_path(kind, D, bs, gs, st, Hq, Hkv):
        QS, KS = int(gs > 1), int(gs // G > 1)
        kpt, qpc = 64 >> KS, 128 >> QS
        nb = bs // st
        bpt = _proxy_bpt(nb, kpt)
        hm = get_kernel(_SRC_POOL, f"head_mean<{ct}, {ct}>")
        if QS:    # hi/lo means of the group's q heads at the kept rows
            qs = cp.empty((B, C, nrow, 2 * D), cp.uint16)
            launch(hm, (_cdiv(nrow * D, 256), C, B), (256,),
                   (qd, qs, _I32(Hq), _I32(Sq), _I32(D), _I32(C), _I32(gs), _I32(1), _I32(1),
                    _I32(st), _I32(nrow)))
            qsrc, q_sb, q_sh, q_rs = qs, C * nrow * 2 * D, nrow * 2 * D, 2 * D
        else:     # g = 1 (MHA): proxy head c is q head c, kept rows read in place
            qsrc, q_sb, q_sh, q_rs = qd, Hq * Sq * D, Sq * D, st * D
        if KS:    # hi/lo means of the group's kv heads at the kept keys
            kt = cp.empty((B, C, nkey, 2 * D), cp.uint16)
            launch(hm, (_cdiv(nkey * D, 256), C, B), (256,),
                   (kd, kt, _I32(Hkv), _I32(Sk), _I32(D), _I32(C), _I32(gs), _I32(G), _I32(1),
                    _I32(st), _I32(nkey)))
            ksrc, k_sb, k_sh, k_rs = kt, C * nkey * 2 * D, nkey * 2 * D, 2 * D
        else:     # g = G: proxy head c reads kv head c, kept keys read in place
            ksrc, k_sb, k_sh, k_rs = kd, Hkv * Sk * D, Sk * D, st * D
        nsa = _cdiv(nrow, qpc) * qpc
        kba = Kb if bpt == 1 else _cdiv(nkey, kpt) * bpt
        per_head = (kba + 2) * nsa * 4
        BC = B * C
        group = max(1, min(BC, 65535, PROXY_SCRATCH_BYTES // per_head))
        zmx = cp.empty((group, kba, nsa), cp.float32)
        rst = cp.empty((group, 2, nsa), cp.float32)
        S = cp.empty((B, C, Qb, Kb), cp.float32)
        ktile = get_kernel(_SRC_PX, f"proxy_tc<{ct}, {D}, {QS}, {KS}, {bpt}>")
        kred = get_kernel(_SRC_PX, "proxy_reduce<0>")
        for bc0 in range(0, BC, group):
            g = min(group, BC - bc0)
            launch(ktile, (nsa // qpc, g), (128,),
                   (qsrc, ksrc, zmx, rst, _I64(q_sb), _I64(q_sh), _I64(q_rs), _I64(k_sb),
                    _I64(k_sh), _I64(k_rs), _I32(C), _I32(Sq), _I32(Sk), _I32(st), _I32(nrow),
                    _I32(nkey), _I32(nb), _I32(nsa), _I32(kba), _F32(scale * _LOG2E),
                    _I32(causal), _I32(bc0)),
                   shared_mem=_eng_smem(D))
            launch(kred, (Qb, g), (256,),
                   (zmx, rst, S, _I32(Sq), _I32(Sk), _I32(bs), _I32(st), _I32(nrow), _I32(nkey),
                    _I32(nb), _I32(Qb), _I32(Kb), _I32(nsa), _I32(kba), _I32(causal),
                    _I32(bc0)),
                   shared_mem=3 * nb * 4)
        return _deliver((S,), out, host, ("proxy_scores",))
    hm = get_kernel(_SRC_POOL, f"head_mean<{ct}, double>")
    qt = cp.empty((B, C, nrow, D), cp.float64)
    kt = cp.empty((B, C, nkey, D), cp.float64)
    launch(hm, (_cdiv(nrow * D, 256), C, B), (256,),
           (qd, qt, _I32(Hq), _I32(Sq), _I32(D), _I32(C), _I32(gs), _I32(1), _I32(0), _I32(st),
            _I32(nrow)))
    launch(hm, (_cdiv(nkey * D, 256), C, B), (256,),
           (kd, kt, _I32(Hkv), _I32(Sk), _I32(D), _I32(C), _I32(gs), _I32(G), _I32(0), _I32(st),
            _I32(nkey)))
    S = cp.zeros((B, C, Qb, Kb), cp.float64)
    launch(get_kernel(_SRC_PX, "proxy_exact<0>"), (_cdiv(nrow, 4), B * C), (128,),
           (qt, kt, S, _I32(Sq), _I32(Sk), _I32(D), _I32(bs), _I32(st), _I32(nrow), _I32(nkey),
            _I32(Qb), _I32(Kb), _F64(scale), _I32(causal)), shared_mem=4 * D * 8)
    return _deliver((_finish(S, kind),), out, host, ("proxy_scores",))


def _pool(xd: Any, kind: str, block: int, true_len: bool) -> Any:
    """float64 block means ``[B, H, ceil(S/block), D]`` (true length or zero padding)."""
    B, H, S, D = xd.shape
    n = _cdiv(S, block)
    out = cp.empty((B, H, n, D), cp.float64)
    launch(get_kernel(_SRC_POOL, f"win_mean<{_CT[kind]}, double>"), (n, B * H), (128,),
           (xd, out, _I32(S), _I32(D), _I32(block), _I32(block), _I32(n), _I32(bool(true_len)),
            _I32(0)))
    return out


def _pooled_softmax(z: Any, mode: int, Sq: int, Sk: int, bs: int, mseg: int, causal: bool,
                    scale: float) -> Any:
    B, H, nq, nk = z.shape
    out = cp.empty_like(z)
    rows = B * H * nq
    launch(get_kernel(_SRC_POOL, f"pooled_softmax<{mode}>"), (_cdiv(rows, 4),), (128,),
           (z, out, _I32(nq), _I32(nk), _I32(Sq), _I32(Sk), _I32(bs), _I32(mseg),
            _I32(bool(causal)), _F64(scale), _I64(rows)))
    return out


def proxyattn_budget_fast_path(kind: str, D: int) -> bool:
    """True when ``proxyattn_budget_score`` runs on tensor cores (bf16/fp16, D in {64, 128},
    sm_80+)."""
    return _tc(kind, D)


@register("proxyattn_budget_score", "cupy")
def proxyattn_budget_score(q: Any, k: Any, block_size: int, causal: bool, *,
                           out: Any = None) -> tuple[Any]:
    """Per-head block attention of the last query block for ProxyAttn's budgets (reference
    ``proxyattn_budget_scores``): for the rows ``L`` of the last query block, the causal
    token-level softmax of each head over all keys, ``a[h, J] = sum_{r in L, t in J} p /
    (|L| |J|)`` (true lengths; a row that sees no key adds 0). bf16/fp16 with D in
    {64, 128}: tensor cores, fp32 softmax (two passes over key splits, block sums by
    atomics); otherwise float64, one warp per row. Returns ``(a,)`` ``[B, Hq, Kb]``."""
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "proxyattn_budget_score")
    bs = _positive("block_size", block_size)
    G, Qb, Kb = Hq // Hkv, _cdiv(Sq, bs), _cdiv(Sk, bs)
    r0 = (Qb - 1) * bs
    ell = Sq - r0
    ct = _CT[kind]
    scale = 1.0 / math.sqrt(D)
    causal = bool(causal)
    if proxyattn_budget_fast_path(kind, D):
        tps = PROXY_BUDGET_TILES_PER_SPLIT
        nsplit, nrt = _cdiv(_cdiv(Sk, 64), tps), _cdiv(ell, 128)
        ella = nrt * 128
        stM = cp.empty((B * Hq, nsplit, ella), cp.float32)
        stL = cp.empty((B * Hq, nsplit, ella), cp.float32)
        a = cp.zeros((B, Hq, Kb), cp.float32)
        args = (qd, kd, stM, stL, a, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(r0), _I32(ell),
                _I32(bs), _I32(Kb), _I32(nsplit), _I32(tps), _I32(ella), _F32(scale * _LOG2E),
                _I32(causal))
        for mode in (0, 1):
            launch(get_kernel(_SRC_PX, f"proxy_budget_tc<{ct}, {D}, {mode}>"),
                   (nsplit, nrt, B * Hq), (128,), args, shared_mem=_eng_smem(D))
        return _deliver((a,), out, host, ("budget_scores",))
    a = cp.zeros((B, Hq, Kb), cp.float64)
    launch(get_kernel(_SRC_PX, f"proxy_budget_exact<{ct}>"), (_cdiv(ell, 4), B * Hq), (128,),
           (qd, kd, a, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D), _I32(r0), _I32(ell),
            _I32(bs), _I32(Kb), _F64(scale), _I32(causal)), shared_mem=4 * D * 8)
    return _deliver((_finish(a, kind),), out, host, ("budget_scores",))


# ----------------------------------------------------------------------------------- PBS
def pbs_key_importance_fast_path(kind: str, D: int) -> bool:
    """True when ``pbs_key_importance`` runs on tensor cores (bf16/fp16, D in {64, 128})."""
    return _tc(kind, D)


@register("pbs_key_importance", "cupy")
def pbs_key_importance(q: Any, k: Any, block_size: int, segment_size: int, *,
                       out: Any = None) -> tuple[Any]:
    """PBS key importance (reference ``refattn.methods.pbs.pbs_key_importance``):
    ``w[t] = mean over the last min(b, L) queries of softmax_t(q . k_t / sqrt(D))`` over the
    keys of the complete segments (``t < floor(L/s)*s``), no causal mask. Returns ``(w,)``
    ``[B, Hq, floor(L/s)*s]``."""
    qd, kd, kind, host, (B, Hq, Hkv, L, Lk, D) = _qk(q, k, "pbs_key_importance")
    if Lk != L:
        raise InputError(f"pbs_key_importance: q_len and k_len must be equal, got {L} and {Lk}")
    b, s = _positive("block_size", block_size), _positive("segment_size", segment_size)
    T = (L // s) * s
    ell = min(b, L)
    G = Hq // Hkv
    ct = _CT[kind]
    scale = 1.0 / math.sqrt(D)
    if T == 0:
        w = cp.empty((B, Hq, 0), cp.float32 if _lowp(kind) else cp.float64)
        return _deliver((w,), out, host, ("key_importance",))
    if pbs_key_importance_fast_path(kind, D):
        tps = PBS_KI_TILES_PER_SPLIT
        nsplit, nrt = _cdiv(_cdiv(T, 64), tps), _cdiv(ell, 128)
        ella = nrt * 128
        stM = cp.empty((B * Hq, nsplit, ella), cp.float32)
        stL = cp.empty((B * Hq, nsplit, ella), cp.float32)
        w = (cp.zeros if nrt > 1 else cp.empty)((B, Hq, T), cp.float32)
        args = (qd, kd, stM, stL, w, _I32(Hq), _I32(G), _I32(L), _I32(ell), _I32(T),
                _I32(nsplit), _I32(tps), _I32(ella), _F32(scale * _LOG2E), _I32(nrt > 1))
        for mode in (0, 1):
            launch(get_kernel(_SRC_PX, f"pbs_ki_tc<{ct}, {D}, {mode}>"), (nsplit, nrt, B * Hq),
                   (128,), args, shared_mem=_eng_smem(D))
        return _deliver((w,), out, host, ("key_importance",))
    w = cp.zeros((B, Hq, T), cp.float64)
    launch(get_kernel(_SRC_PX, f"pbs_ki_exact<{ct}>"), (_cdiv(ell, 4), B * Hq), (128,),
           (qd, kd, w, _I32(Hq), _I32(G), _I32(L), _I32(D), _I32(ell), _I32(T), _F64(scale)),
           shared_mem=4 * D * 8)
    return _deliver((_finish(w, kind),), out, host, ("key_importance",))


@register("pbs_score", "cupy")
def pbs_score(q: Any, k_perm: Any, block_size: int, segment_size: int, *,
              out: Any = None) -> tuple[Any]:
    """PBS block probabilities on permuted keys (reference
    ``refattn.methods.pbs.pbs_block_scores``): zero-padded block means of q and ``k_perm``
    (both ``[B, Hq, L, D]``), ``z = q_I . k'_J / sqrt(D)`` allowed off the diagonal segment
    and block-causal, softmax over J; rows without an allowed block (segment 0) are NaN.
    Float64 throughout. Returns ``(p,)`` ``[B, Hq, n, n]``, ``n = ceil(L / b)``."""
    qd, kd, kind, host, (B, Hq, Hk, L, Lk, D) = _qk(q, k_perm, "pbs_score")
    if Hk != Hq or Lk != L:
        raise InputError(f"pbs_score: k_perm must be [B, Hq, L, D] like q (one permuted key "
                         f"sequence per query head), got q {tuple(qd.shape)}, k_perm "
                         f"{tuple(kd.shape)}")
    b, s = _positive("block_size", block_size), _positive("segment_size", segment_size)
    mseg = s // b
    if mseg < 1:
        raise InputError(f"segment_size: must be at least block_size={b}, got {s}")
    qm, km = _pool(qd, kind, b, False), _pool(kd, kind, b, False)
    z = cp.matmul(qm, km.transpose(0, 1, 3, 2))
    p = _pooled_softmax(z, 1, L, L, b, mseg, True, 1.0 / math.sqrt(D))
    return _deliver((_finish(p, kind),), out, host, ("block_scores",))


__all__ = ["nsa_score", "nsa_block_scores", "proxyattn_score", "proxyattn_budget_score",
           "pbs_key_importance", "pbs_score", "nsa_fast_path", "nsa_kernel_used",
           "proxyattn_fast_path", "proxyattn_budget_fast_path", "pbs_key_importance_fast_path"]
