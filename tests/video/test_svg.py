"""Sparse VideoGen: profiling masks and execution masks against transliterations of the
official code (svg-project/Sparse-VideoGen@5ce7b01), head classification, the full
permute / FlexAttention / un-permute pipeline, kernels, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

import refattn
from refattn.core.errors import InputError
from refattn.core.video_grid import VideoGrid
from refattn.data.synthetic import synthetic
from refattn.video.svg import (
    SVGParams,
    band_tokens,
    default_rows,
    execution_rows,
    profile_rows,
    svg_masked_row_mse,
)

GRID, CTX, PROMPT, PB, RND = (4, 4, 8), 8, 5, 16, 8      # F = 4 frames of fs = 32 tokens
F, FS = 4, 32
L = F * FS + CTX


def official_profile_masks(ctx, F, fs, pb, first):
    """``get_attention_mask`` of hyvideo/utils.py (text last) and cog/utils.py (text first)."""
    Lt = ctx + F * fs
    nblk, thr = math.ceil(F * fs / pb), (fs * 1.5) // pb
    out = []
    for name in ("spatial", "temporal"):
        att = np.zeros((Lt, Lt), bool)
        if first and name == "spatial":                    # cog: band on absolute positions
            att[:ctx, :] = True
            att[:, :ctx] = True
            for i in range(nblk):
                for j in range(nblk):
                    if abs(i - j) < thr:
                        att[i * pb:(i + 1) * pb, j * pb:(j + 1) * pb] = True
            out.append(att)
            continue
        pix = np.zeros((F * fs, F * fs), bool)
        for i in range(nblk):
            for j in range(nblk):
                if abs(i - j) < thr:
                    pix[i * pb:(i + 1) * pb, j * pb:(j + 1) * pb] = True
        if name == "temporal":
            pix = pix.reshape(fs, F, fs, F).transpose(1, 0, 3, 2).reshape(F * fs, F * fs)
        v = slice(ctx, None) if first else slice(0, F * fs)
        att[v, v] = pix
        t = slice(0, ctx) if first else slice(F * fs, None)
        att[t, :] = True
        att[:, t] = True
        out.append(att)
    return out


def official_mask_mod(ctx, prompt, F, fs, mul, rnd, first):
    """``generate_temporal_head_mask_mod`` (hyvideo, text last / cog, text first) as a matrix."""
    qi, ki = np.meshgrid(np.arange(ctx + F * fs), np.arange(ctx + F * fs), indexing="ij")
    two_frame = math.floor(mul * fs / rnd) * rnd
    band = np.abs(qi - ki) < two_frame
    if first:
        return (qi < ctx) | (ki < ctx) | band
    real_length = F * fs + prompt
    real = (ki < real_length) & (qi < real_length)
    fake = (ki >= real_length) & (qi >= real_length)
    col = (F * fs <= ki) & (ki < real_length)
    row = (F * fs <= qi) & (qi < real_length)
    return (real & (band | col | row)) | fake


def official_width(s, ctx, F, fs):
    N = ctx + F * fs
    s = (s * N * N - 2 * N * ctx) / (N * N)
    return N * (1 - math.sqrt(1 - s)) / fs


def _params(first=False, **kw):
    base = dict(grid=GRID, text_tokens=CTX, text_position="first" if first else "last",
                prompt_length=None if first else PROMPT, sparsity=0.5, profile_block=PB,
                band_round=RND, block_size=16)
    base.update(kw)
    return SVGParams(**base)


@pytest.mark.parametrize("first", [False, True])
def test_profile_masks_match_official(first):
    p = _params(first)
    g = VideoGrid.from_params(GRID, CTX, p.text_position)
    want = official_profile_masks(CTX, F, FS, PB, first)
    rows = np.arange(L)
    for m in (0, 1):
        np.testing.assert_array_equal(profile_rows(m, rows, p, g), want[m])


@pytest.mark.parametrize("first", [False, True])
def test_execution_pipeline_matches_official(first):
    """Permute temporal heads to token-major, FlexAttention with the official mask_mod,
    permute back; refattn.attention on the selection must give the same output."""
    p = _params(first)
    g = VideoGrid.from_params(GRID, CTX, p.text_position)
    mul = official_width(0.5, CTX, F, FS)
    assert band_tokens(p, g) == math.floor(mul * FS / RND) * RND
    mm = official_mask_mod(CTX, CTX if first else PROMPT, F, FS, mul, RND, first)
    q, k, v = _classify_inputs(first)
    q, k, v = np.concatenate([q, q[:, ::-1]], 1), k, v        # GQA: 4 query heads, 2 kv heads
    sel = refattn.select(q, k, "svg", v=v, causal=False, **vars(p))
    assert set(sel.extras["best_mask_idx"].ravel()) == {0, 1}      # both patterns covered
    got = refattn.attention(q, k, v, mask=sel)
    vid = slice(CTX, None) if first else slice(0, F * FS)
    tm = np.arange(L)
    tm[vid] = tm[vid].reshape(F, FS).T.reshape(-1)          # token-major order (positions)
    for h in range(4):
        temporal = sel.extras["best_mask_idx"][0, h] == 1
        order = tm if temporal else np.arange(L)
        qq, kk, vv = q[:, h:h + 1, order], k[:, h // 2:h // 2 + 1, order], v[:, h // 2:h // 2 + 1, order]
        o = refattn.attention(qq, kk, vv, mask=refattn.BlockMask(mm, block_q=1, block_k=1,
                                                                  q_len=L, k_len=L))
        back = np.empty_like(o)
        back[:, :, order] = o
        np.testing.assert_allclose(got[:, h:h + 1], back, rtol=1e-10, atol=1e-12)
    # the covering block mask holds every allowed pair, and only blocks that hold one
    tok = sel.extras["token_mask"].to_token_mask()
    cover = np.logical_or.reduceat(np.logical_or.reduceat(tok, np.arange(0, L, 16), axis=2),
                                   np.arange(0, L, 16), axis=3)
    np.testing.assert_array_equal(sel.mask.mask, cover)


def _classify_inputs(first=False):
    """Head 0 temporal (tokens match the same spatial position in every frame), head 1 spatial
    (tokens match every token of their own frame)."""
    rng = np.random.default_rng(0)
    D = 32
    pos_emb, frame_emb = rng.standard_normal((FS, D)), rng.standard_normal((F, D))
    q = 0.1 * rng.standard_normal((1, 2, L, D))
    k = 0.1 * rng.standard_normal((1, 2, L, D))
    v = rng.standard_normal((1, 2, L, D))
    n, vid = np.arange(F * FS), slice(CTX, None) if first else slice(0, F * FS)
    q[0, 0, vid] += 3 * pos_emb[n % FS]
    k[0, 0, vid] += 3 * pos_emb[n % FS]
    q[0, 1, vid] += 3 * frame_emb[n // FS]
    k[0, 1, vid] += 3 * frame_emb[n // FS]
    return q, k, v


@pytest.mark.parametrize("backend,first", [("numpy", False), ("numba", False), ("numpy", True)])
def test_classification(backend, first):
    q, k, v = _classify_inputs(first)
    rows = tuple(range(0, F * FS, 5))
    sel = refattn.select(q, k, "svg", v=v, causal=False, backend=backend,
                         **vars(_params(first, rows=rows)))
    assert sel.extras["pattern"].tolist() == [["temporal", "spatial"]]
    mse = sel.extras["mse"]
    assert mse[0, 0, 1] < mse[0, 0, 0] and mse[0, 1, 0] < mse[0, 1, 1]


def test_masked_row_mse_brute_force():
    q, k, v = _classify_inputs()
    rows = np.array([3, 50, 50, 131])
    masks = np.stack([np.random.default_rng(1).random((4, L)) < 0.4, np.ones((4, L), bool)])
    masks[0, 1] = False                                        # no key visible: output 0
    (mse,) = svg_masked_row_mse(q, k, v, rows, masks, 0.2)
    for h in range(2):
        for m in range(2):
            err = 0.0
            for r, row in enumerate(rows):
                s = 0.2 * (k[0, h] @ q[0, h, row])
                gold = np.exp(s - s.max()) @ v[0, h] / np.exp(s - s.max()).sum()
                vis = masks[m, r]
                o = np.zeros(v.shape[-1])
                if vis.any():
                    e = np.exp(s[vis] - s[vis].max())
                    o = e @ v[0, h][vis] / e.sum()
                err += ((o - gold) ** 2).sum()
            assert mse[0, h, m] == pytest.approx(err / (4 * v.shape[-1]), rel=1e-12)
    assert mse[0, 0, 1] == pytest.approx(0.0, abs=1e-28)       # the full mask is the golden


def test_sampled_rows_default_and_override():
    g = VideoGrid.from_params(GRID, CTX, "last")
    a = default_rows(_params(), g)
    assert a.shape == (64,) and a.min() >= 0 and a.max() < L
    np.testing.assert_array_equal(a, default_rows(_params(), g))                  # seeded
    assert not np.array_equal(a, default_rows(_params(seed=1), g))
    assert default_rows(_params(sample_max_row=10), g).max() < 10
    np.testing.assert_array_equal(default_rows(_params(rows=(1, 2)), g), [1, 2])


def test_execution_rows_tokens():
    p = _params()
    g = VideoGrid.from_params(GRID, CTX, "last")
    W = band_tokens(p, g)
    sp = execution_rows(0, np.array([40]), p, g)[0]
    assert sp[40 - W + 1: 40 + W].all() and not sp[40 - W] and not sp[40 + W]
    assert sp[F * FS:F * FS + PROMPT].all() and not sp[F * FS + PROMPT:].any()     # padding off
    tp = execution_rows(1, np.array([40]), p, g)[0]          # frame 1, position 8
    assert tp[[8, 40, 72, 104]].all()                        # same position in every frame
    pad = execution_rows(0, np.array([L - 1]), p, g)[0]      # padded text sees only padding
    assert pad[F * FS + PROMPT:].all() and not pad[:F * FS + PROMPT].any()


@pytest.mark.parametrize("kw", [dict(grid=None), dict(grid=(4, 4, 9)), dict(sparsity=2.0),
                                dict(prompt_length=9), dict(rows=(0, L)),
                                dict(text_position="first", prompt_length=3),
                                dict(num_sampled_rows=0)])
def test_errors(kw):
    q, k, v = synthetic(1, 2, 1, L, 16, seed=0)
    with pytest.raises(InputError):
        refattn.select(q, k, "svg", v=v, causal=False, **{**vars(_params()), **kw})
    with pytest.raises(InputError):
        refattn.select(q, k, "svg", v=v, causal=True, **vars(_params()))


def test_kernel_registry_check():
    """The registry-driven kernel check (tests/test_registry.py) on this method's op; run
    here too because that module only sees ops whose modules are imported at collection."""
    from test_registry import test_kernel_matches_reference

    import refattn.cases.video_scores  # noqa: F401

    test_kernel_matches_reference("svg_masked_row_mse", "numba")
