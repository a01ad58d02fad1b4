"""PSA's new-mask-type attention kernel (``kernel="new"``) against a loop transliteration of
the official ``src/psa_triton/kernels/psa_kernel.py`` (``_fwd_kernel`` lines 206-316,
``_fwd_kernel_inner`` lines 44-78, ``_forward`` lines 381-397), written independently of
:mod:`refattn.reference.pyramid`: it walks the new-format mask rows (block ids per level in
rank order, ``-1`` after each level) tile by tile, with the two-block merge and the lanes it
leaves at ``offs = offs_n``. Also: Numba == reference for both kernels, the defaults run the
new kernel, the refused (undefined) inputs, and the new kernel's level per mask group."""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.reference.pyramid import pyramid_attention, pyramid_attention_forward
from refattn.testing import random_qkv, structured_qkv
from refattn.video import psa


# ------------------------------------------------------------- the transliteration
def _official_pyramid(x: np.ndarray, block_n: int) -> dict[int, np.ndarray]:
    """``_forward``: K (unpadded), then pad_to_multiple(block_n, replicate) and pooling by 2
    three times (``pooling(x, 2)`` = mean of consecutive pairs)."""
    pad = -x.shape[0] % block_n
    xp = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    out = {1: x}
    cur = xp
    for lvl in (2, 4, 8):
        cur = cur.reshape(-1, 2, cur.shape[-1]).mean(axis=1)
        out[lvl] = cur
    return out


def _official_new_kernel(q, k, v, rows, BLOCK_M, BLOCK_N, POOLING_BLOCK_N, sm_scale,
                         causal=False):
    """One head: q [Sq, D], k/v [Sk, D] float64; ``rows`` int [Qb, BLOCK_NUM], one new-format
    mask row per query block. Returns out [Sq, Dv], lse [Sq]. ``causal``: the legacy rule
    (last pooled key <= query + Sk - Sq) per lane, refattn's extension."""
    K, V = _official_pyramid(k, POOLING_BLOCK_N), _official_pyramid(v, POOLING_BLOCK_N)
    N_CTX = {lvl: K[lvl].shape[0] for lvl in K}          # level 1: k.shape[2] (unpadded)
    PBN = {lvl: POOLING_BLOCK_N // lvl for lvl in K}
    BLOCK_NUM = rows.shape[1]
    Sq, Sk = q.shape[0], k.shape[0]
    out, lse = np.zeros((Sq, v.shape[1])), np.full(Sq, -np.inf)
    offs_n = np.arange(BLOCK_N)
    for start_m in range(rows.shape[0]):
        offs_m = np.arange(start_m * BLOCK_M, min((start_m + 1) * BLOCK_M, Sq))
        qb = q[offs_m]
        m_i, l_i = np.full(len(offs_m), -np.inf), np.zeros(len(offs_m))
        acc = np.zeros((len(offs_m), v.shape[1]))
        mask = rows[start_m]
        MASK_MODE, block_idx = 1, 0
        while block_idx < BLOCK_NUM and MASK_MODE <= 8:
            block_addr = int(mask[block_idx])
            if block_addr == -1:
                MASK_MODE *= 2
                block_idx += 1
                continue
            P = PBN[MASK_MODE]
            if P >= BLOCK_N:
                offs = offs_n + block_addr * P
                block_idx += 1
            else:
                offs = offs_n.copy()
                for i in range(2):
                    delta = (offs_n >= i * P) & (offs_n < (i + 1) * P)
                    offs = offs + np.where(delta, block_addr * P - i * P, 0)
                    block_idx += 1
                    block_addr = int(mask[block_idx]) if block_idx < BLOCK_NUM else -2
            for _ in range(P // BLOCK_N if P >= BLOCK_N else 1):
                assert (offs >= 0).all(), "the kernel would read before the pooled array"
                valid = offs < N_CTX[MASK_MODE]
                safe = np.where(valid, offs, 0)
                qk = sm_scale * (qb @ K[MASK_MODE][safe].T)
                qk = qk + np.where(valid, 0.0, -np.inf)[None, :] + np.log(MASK_MODE)
                if causal:
                    last = (offs + 1) * MASK_MODE - 1
                    qk = np.where(last[None, :] <= offs_m[:, None] + Sk - Sq, qk, -np.inf)
                m_ij = np.maximum(m_i, qk.max(axis=1))
                with np.errstate(invalid="ignore"):
                    p = np.exp(qk - m_ij[:, None])
                    alpha = np.exp(m_i - m_ij)
                p = np.where(np.isfinite(m_ij)[:, None], p, 0.0)
                alpha = np.where(np.isfinite(m_ij), alpha, 1.0)
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * alpha[:, None] + p @ np.where(valid[:, None], V[MASK_MODE][safe], 0.0)
                m_i = m_ij
                offs = offs + BLOCK_N
        ok = l_i > 0
        out[offs_m[ok]] = acc[ok] / l_i[ok, None]
        lse[offs_m[ok]] = m_i[ok] + np.log(l_i[ok])
    return out, lse


def _rows_from_levels(lv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New-format rows [Qb, Kb + 5] from levels [Qb, Kb]: per level 1, 2, 4, 8, 0 the block
    ids in a random ("rank") order, each group followed by -1."""
    qb, kb = lv.shape
    rows = np.zeros((qb, kb + 5), np.int64)
    for i in range(qb):
        perm = rng.permutation(kb)
        row = []
        for lvl in (1, 2, 4, 8, 0):
            row += [int(j) for j in perm if lv[i, j] == lvl] + [-1]
        rows[i] = row
    return rows


def _random_levels(rng, qb, kb, block_k, tile_n, allow=(0, 1, 2, 4, 8)):
    """Levels with an even count per row of every level of fewer than tile_n pooled rows."""
    lv = rng.choice(allow, size=(qb, kb))
    for lvl in (2, 4, 8):
        if block_k // lvl >= tile_n:
            continue
        for i in range(qb):
            js = np.nonzero(lv[i] == lvl)[0]
            if js.size % 2:
                lv[i, js[0]] = 0
    return lv


def _per_head(fn, q, k, v, rows_bh, **kw):
    B, Hq = q.shape[:2]
    G = Hq // k.shape[1]
    o = np.zeros(q.shape[:3] + (v.shape[3],))
    lse = np.zeros(q.shape[:3])
    for b in range(B):
        for h in range(Hq):
            o[b, h], lse[b, h] = fn(q[b, h].astype(np.float64), k[b, h // G].astype(np.float64),
                                    v[b, h // G].astype(np.float64), rows_bh[b][h], **kw)
    return o, lse


# (Sq, Sk, block_q, block_k, tile_n, allowed levels): P < tile_n with unmapped lanes (64/32
# level 8; 32/32 levels 4, 8; 64/64), P = tile_n/2 (no unmapped lane), P >= tile_n with
# several tiles (64/16), P % tile_n != 0 (48/16: level 1 and 2 blocks in part), partial last
# key blocks, odd block counts at levels with P >= tile_n.
GEOMETRIES = [
    (250, 250, 64, 64, 32, (0, 1, 2, 4, 8)),
    (203, 203, 32, 32, 32, (0, 1, 2, 4, 8)),
    (150, 260, 32, 64, 16, (0, 1, 2, 4, 8)),
    (200, 400, 64, 64, 64, (0, 1, 2, 4, 8)),
    (120, 290, 32, 48, 16, (0, 1, 2, 8)),
    (96, 600, 32, 128, 32, (0, 1, 2, 4, 8)),
]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[f"bk{g[3]}_t{g[4]}" for g in GEOMETRIES])
@pytest.mark.parametrize("causal", [False, True])
def test_new_kernel_matches_transliteration(geo, causal):
    Sq, Sk, bq, bk, tn, allow = geo
    rng = np.random.default_rng(bk * 100 + tn + causal)
    q, k, v = structured_qkv(rng, 1, 2, 1, Sq, Sk, 16)
    qb, kb = -(-Sq // bq), -(-Sk // bk)
    lv = np.stack([_random_levels(rng, qb, kb, bk, tn, allow) for _ in range(2)])[None]
    lv[0, 0, 0] = 8 if 8 in allow else 1                   # one row all at the top level
    if kb % 2 and bk // 8 < tn:
        lv[0, 0, 0, -1] = 1
    rows = [[_rows_from_levels(lv[0, h], rng) for h in range(2)]]
    scale = 0.25
    want = _per_head(_official_new_kernel, q, k, v, rows, BLOCK_M=bq, BLOCK_N=tn,
                     POOLING_BLOCK_N=bk, sm_scale=scale, causal=causal)
    got = pyramid_attention_forward(q, k, v, lv, bq, bk, causal, scale, "new", tn)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
    fin = np.isfinite(want[1])
    np.testing.assert_allclose(got[1][fin], want[1][fin], rtol=0, atol=1e-12)
    # without the causal mask the legacy kernel differs exactly where a pair re-reads
    # unmapped lanes or a block's tail rows (P % tile_n) are left out
    if not causal:
        leg = pyramid_attention_forward(q, k, v, lv, bq, bk, causal, scale, "legacy")
        used = [int(x) for x in np.unique(lv) if x > 0]
        stale = any(bk // lvl < tn and 2 * (bk // lvl) < min(tn, kb * (bk // lvl))
                    and ((lv == lvl).sum(-1) >= 2).any() for lvl in used)
        tails = any(bk // lvl >= tn and (bk // lvl) % tn for lvl in used)
        assert (np.abs(leg[0] - got[0]).max() > 1e-6) == (stale or tails)


def test_unmapped_lanes_explicitly():
    """block_k 64, tile_n 32, one query block with level-8 blocks {0, 4} (one pair) and Kb = 6:
    the tile holds pooled rows 0..7 (block 0), 32..39 (block 4) and 16..31 (blocks 2 and 3)."""
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 1, 1, 1, 64, 384, 16)
    lv = np.array([[8, 0, 0, 0, 8, 0]])
    o, lse = pyramid_attention_forward(q, k, v, lv, 64, 64, False, 0.25, "new", 32)
    kp, vp = psa.pooled_kv(k, 64, 8)[0, 0], psa.pooled_kv(v, 64, 8)[0, 0]
    idx = np.r_[0:8, 32:40, 16:32]
    z = 0.25 * q[0, 0].astype(np.float64) @ kp[idx].T + np.log(8)
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(o[0, 0], p @ vp[idx] / p.sum(1, keepdims=True), atol=1e-12)
    # two pairs: the rows 16..31 twice
    lv2 = np.array([[8, 8, 0, 0, 8, 8]])
    o2, _ = pyramid_attention_forward(q, k, v, lv2, 64, 64, False, 0.25, "new", 32)
    idx2 = np.r_[0:16, 32:48, 16:32, 16:32]
    z = 0.25 * q[0, 0].astype(np.float64) @ kp[idx2].T + np.log(8)
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(o2[0, 0], p @ vp[idx2] / p.sum(1, keepdims=True), atol=1e-12)


# ----------------------------------------------------------- selection end to end
@pytest.mark.parametrize("mode", ["topk", "thresholdbound"])
def test_default_select_runs_new_kernel_on_the_newtype_mask(mode):
    rng = np.random.default_rng(11)
    q, k, v = structured_qkv(rng, 1, 2, 2, 1000, 1000, 32)
    sel = refattn.select(q, k, "psa", v=v, causal=False, mode=mode, seed=1)
    assert sel.extras["kernel"] == "new" and sel.extras["tile_n"] == 32
    assert (sel.extras["levels"] == 8).any()               # level 8: P = 8 < tile_n
    got = psa.attention(q, k, v, sel, return_lse=True)
    want = _per_head(_official_new_kernel, q, k, v, sel.extras["newtype"], BLOCK_M=128,
                     BLOCK_N=32, POOLING_BLOCK_N=64, sm_scale=32 ** -0.5)
    np.testing.assert_allclose(got[0], want[0], atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], atol=1e-12)
    np.testing.assert_array_equal(got[0], pyramid_attention(q, k, v, sel, kernel="new"))
    leg = psa.attention(q, k, v, sel, kernel="legacy")
    assert np.abs(leg - got[0]).max() > 1e-3
    old = refattn.select(q, k, "psa", v=v, causal=False, mode=mode, seed=1, mask_type="old")
    assert old.extras["kernel"] == "legacy"
    np.testing.assert_array_equal(psa.attention(q, k, v, old),
                                  pyramid_attention(q, k, v, old, kernel="legacy"))


def test_group_position_sets_the_new_kernel_level():
    """The kernel attends the i-th group of the new-format mask at level 2**i: with ratios
    1, 2, 4, 0 (no level 8) the fourth group, declared skipped, is attended at level 8."""
    rng = np.random.default_rng(12)
    q, k, v = structured_qkv(rng, 1, 1, 1, 512, 512, 16)
    ratios = ((1, 0, .25), (2, .25, .5), (4, .5, .75), (0, .75, 1.0))
    kw = dict(v=v, causal=False, block_q=64, block_k=32, tile_n=4, ratios=ratios, seed=2)
    sel = refattn.select(q, k, "psa", **kw)
    leg = refattn.select(q, k, "psa", **kw, kernel="legacy")
    lv, lvl = sel.extras["levels"], leg.extras["levels"]
    np.testing.assert_array_equal(lv, np.where(lvl == 0, 8, lvl))
    np.testing.assert_array_equal(sel.extras["newtype"], leg.extras["newtype"])
    got = psa.attention(q, k, v, sel)
    want = _per_head(_official_new_kernel, q, k, v, sel.extras["newtype"], BLOCK_M=64, BLOCK_N=4,
                     POOLING_BLOCK_N=32, sm_scale=0.25)
    np.testing.assert_allclose(got, want[0], atol=1e-12)
    # a fifth group is never walked: declared level 8 after the level-0 group is skipped
    five = ((1, 0, .2), (2, .2, .4), (4, .4, .6), (0, .6, .8), (8, .8, 1.0))
    kw["ratios"] = five
    lv = refattn.select(q, k, "psa", **kw).extras["levels"]
    lvl = refattn.select(q, k, "psa", **kw, kernel="legacy").extras["levels"]
    assert (lvl == 8).any() and (lvl == 0).any()
    np.testing.assert_array_equal(lv, np.select([lvl == 0, lvl == 8], [8, 0], lvl))
    with pytest.raises(InputError, match="unfilled tail"):
        refattn.select(q, k, "psa", v=v, block_q=64, block_k=32, ratios=((1, 0, .5),))
    refattn.select(q, k, "psa", v=v, block_q=64, block_k=32, ratios=((1, 0, .5),), kernel="legacy")


# ------------------------------------------------------------ numba and errors
@pytest.mark.parametrize("kernel", ["legacy", "new"])
@pytest.mark.parametrize("causal", [False, True])
def test_numba_matches_reference_both_kernels(kernel, causal):
    rng = np.random.default_rng(13)
    q, k, v = structured_qkv(rng, 2, 4, 2, 160, 330, 32)
    lv = np.stack([np.stack([_random_levels(rng, 5, 6, 64, 32) for _ in range(4)])
                   for _ in range(2)])
    a = pyramid_attention(q, k, v, lv, block_q=32, block_k=64, causal=causal, return_lse=True,
                          kernel=kernel, tile_n=32)
    b = pyramid_attention(q, k, v, lv, block_q=32, block_k=64, causal=causal, return_lse=True,
                          kernel=kernel, tile_n=32, backend="numba")
    np.testing.assert_allclose(b[0], a[0], atol=2e-6)
    np.testing.assert_array_equal(np.isneginf(b[1]), np.isneginf(a[1]))
    fin = np.isfinite(a[1])
    np.testing.assert_allclose(b[1][fin], a[1][fin], atol=2e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_new_kernel_refuses_undefined_inputs(backend):
    q, k, v = random_qkv(np.random.default_rng(0), 1, 1, 1, 64, 192, 8)
    f = registry.dispatch("pyramid_attention_fwd", backend)
    with pytest.raises(InputError, match="odd number of level-8"):
        f(q, k, v, np.array([[8, 0, 1]]), 64, 64, False, None, "new", 32)
    f(q, k, v, np.array([[8, 0, 1]]), 64, 64, False, None, "legacy", 32)      # legacy: fine
    f(q, k, v, np.array([[2, 0, 1]]), 64, 64, False, None, "new", 32)         # P = tile_n: fine
    with pytest.raises(InputError, match="levels"):
        f(q, k, v, np.array([[16, 0, 1]]), 64, 64, False, None, "new", 32)
    with pytest.raises(InputError, match="power of two"):
        f(q, k, v, np.array([[1, 0, 1]]), 64, 64, False, None, "new", 24)
    with pytest.raises(InputError, match="in part"):                          # P = 24, tile 32
        f(q, k[:, :, :144], v[:, :, :144], np.array([[2, 2, 0]]), 64, 48, False, None, "new", 32)
    with pytest.raises(InputError, match="kernel"):
        f(q, k, v, np.array([[1, 0, 1]]), 64, 64, False, None, "newest", 32)
    with pytest.raises(InputError, match="kernel"):
        refattn.select(q, k, "psa", kernel="fast")
