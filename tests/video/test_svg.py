"""Sparse VideoGen: profiling masks and execution masks against transliterations of the
official code (svg-project/Sparse-VideoGen@5ce7b01: hyvideo, cog and wan), head
classification (with PyTorch's NaN-first argmin), the full permute / FlexAttention /
un-permute pipeline, kernels, errors."""
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
    choose_heads,
    default_rows,
    execution_rows,
    profile_rows,
    svg_masked_row_mse,
)

GRID, CTX, PROMPT, PB, RND = (4, 4, 8), 8, 5, 16, 8      # F = 4 frames of fs = 32 tokens
F, FS = 4, 32
L = F * FS + CTX
MODES = ("hunyuan", "cog", "wan")                          # text last / text first / no text


def _ctx(mode):
    return 0 if mode == "wan" else CTX


def official_profile_masks(ctx, F, fs, pb, first):
    """``get_attention_mask`` of hyvideo/utils.py:47-93 (text last) and cog/utils.py:61-88
    (text first: the temporal mask is ``attention_mask[ctx:, ctx:] = pixel_attn_mask``
    only, no text row or column)."""
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
        if first:                                          # cog temporal: lines 76-86
            out.append(att)
            continue
        t = slice(F * fs, None)
        att[t, :] = True
        att[:, t] = True
        out.append(att)
    return out


def official_wan_profile_masks(F, fs, pb):
    """``get_attention_mask`` of wan/utils.py:63-110 (``context_length = 0``): first-frame
    sink ``[:, :frame_size]`` and a ``frame_size * 2`` band, both set before the permute."""
    Lt = F * fs
    nblk, thr = math.ceil(F * fs / pb), (fs * 2) // pb
    out = []
    for name in ("spatial", "temporal"):
        pix = np.zeros((Lt, Lt), bool)
        pix[:, :fs] = True                                 # First Frame Sink
        for i in range(nblk):
            for j in range(nblk):
                if abs(i - j) < thr:
                    pix[i * pb:(i + 1) * pb, j * pb:(j + 1) * pb] = True
        if name == "temporal":
            pix = pix.reshape(fs, F, fs, F).transpose(1, 0, 3, 2).reshape(Lt, Lt)
        out.append(pix)
    return out


def official_mask_mod(ctx, prompt, F, fs, mul, rnd, mode):
    """``generate_temporal_head_mask_mod`` (hyvideo/utils.py:20-44, text last;
    cog/utils.py:30-46, text first; wan/utils.py:25-41, no text) as a matrix."""
    qi, ki = np.meshgrid(np.arange(ctx + F * fs), np.arange(ctx + F * fs), indexing="ij")
    if mode == "wan":
        two_frame = math.ceil(mul * fs / rnd) * rnd
        return (np.abs(qi - ki) <= two_frame) | (ki < fs)
    two_frame = math.floor(mul * fs / rnd) * rnd
    band = np.abs(qi - ki) < two_frame
    if mode == "cog":
        return (qi < ctx) | (ki < ctx) | band
    real_length = F * fs + prompt
    real = (ki < real_length) & (qi < real_length)
    fake = (ki >= real_length) & (qi >= real_length)
    col = (F * fs <= ki) & (ki < real_length)
    row = (F * fs <= qi) & (qi < real_length)
    return (real & (band | col | row)) | fake


def official_width(s, ctx, F, fs):
    N = ctx + F * fs
    total = N ** 2
    s = (s * total - 2 * N * ctx) / total
    return N * (1 - math.sqrt(1 - s)) / fs


def torch_argmin_lessornan(mse):
    """``torch.argmin(x, dim)`` over the last axis with ATen's ``LessOrNan`` comparator: a
    NaN beats any number, two NaNs or two equal numbers keep the lower index."""
    out = np.empty(mse.shape[:-1], np.int64)
    for idx in np.ndindex(*mse.shape[:-1]):
        best = 0
        for m in range(1, mse.shape[-1]):
            a, b = mse[idx + (m,)], mse[idx + (best,)]
            if math.isnan(b):
                continue
            if math.isnan(a) or a < b:
                best = m
        out[idx] = best
    return out


def _params(first=False, mode=None, **kw):
    mode = mode or ("cog" if first else "hunyuan")
    base = dict(grid=GRID, text_tokens=_ctx(mode),
                text_position="first" if mode == "cog" else "last",
                prompt_length=PROMPT if mode == "hunyuan" else None, sparsity=0.5,
                profile_block=PB, band_round=RND, block_size=16)
    base.update(kw)
    return SVGParams(**base)


@pytest.mark.parametrize("mode,ctx", [("hunyuan", CTX), ("cog", CTX), ("cog", 0), ("wan", 0)])
def test_profile_masks_match_official(mode, ctx):
    p = _params(mode=mode, text_tokens=ctx, variant=mode)   # explicit: cog rules without text
    g = VideoGrid.from_params(GRID, ctx, p.text_position)
    if mode == "wan":
        want = official_wan_profile_masks(F, FS, PB)
    else:
        want = official_profile_masks(ctx, F, FS, PB, mode == "cog")
    rows = np.arange(g.seq_len)
    for m in (0, 1):
        np.testing.assert_array_equal(profile_rows(m, rows, p, g), want[m])


def test_cog_temporal_profile_mask_has_no_text():
    """cog/utils.py:75-86: text rows of the temporal profiling mask see no key, and video rows
    see no text column (only the spatial mask turns text on, lines 66-67)."""
    p = _params(first=True)
    g = VideoGrid.from_params(GRID, CTX, "first")
    tm = profile_rows(1, np.arange(L), p, g)
    assert not tm[:CTX].any() and not tm[:, :CTX].any() and tm[CTX:, CTX:].any(axis=1).all()
    sp = profile_rows(0, np.arange(L), p, g)
    assert sp[:CTX].all() and sp[:, :CTX].all()


def test_wan_temporal_sink_lands_on_token_major_columns():
    """wan/utils.py:93: the sink ``[:, :frame_size]`` is set before the permute, so in
    frame-major terms it is the keys ``c`` with ``tm(c) = (c % fs) * F + c // fs < fs``."""
    p = _params(mode="wan")
    g = VideoGrid.from_params(GRID, 0, "last")
    c = np.arange(F * FS)
    tm = (c % FS) * F + c // FS
    far = np.array([127])                                  # frame 3, position 31: band far away
    sp, tp = profile_rows(0, far, p, g)[0], profile_rows(1, far, p, g)[0]
    assert sp[c < FS].all() and tp[tm < FS].all()
    assert not tp[(tm >= FS) & (np.abs(tm // PB - tm[127] // PB) >= 4)].any()
    ex = execution_rows(1, far, p, g)[0]
    assert ex[tm < FS].all()


@pytest.mark.parametrize("mode", MODES)
def test_execution_pipeline_matches_official(mode):
    """Permute temporal heads to token-major, FlexAttention with the official mask_mod,
    permute back; refattn.attention on the selection must give the same output."""
    ctx = _ctx(mode)
    Lm, first = ctx + F * FS, mode == "cog"
    vid = slice(ctx, None) if first else slice(0, F * FS)
    # video rows only: a sampled text row makes every head temporal with text first
    p = _params(mode=mode, rows=tuple(range(vid.start, vid.start + F * FS, 3)))
    g = VideoGrid.from_params(GRID, ctx, p.text_position)
    mul = official_width(0.5, ctx, F, FS)
    rnd = math.ceil if mode == "wan" else math.floor
    assert band_tokens(p, g) == rnd(mul * FS / RND) * RND
    mm = official_mask_mod(ctx, {"hunyuan": PROMPT}.get(mode, ctx), F, FS, mul, RND, mode)
    q, k, v = _classify_inputs(first, ctx)
    q, k, v = np.concatenate([q, q[:, ::-1]], 1), k, v        # GQA: 4 query heads, 2 kv heads
    sel = refattn.select(q, k, "svg", v=v, causal=False, **vars(p))
    assert sel.extras["variant"] == mode
    assert set(sel.extras["best_mask_idx"].ravel()) == {0, 1}      # both patterns covered
    got = refattn.attention(q, k, v, mask=sel)
    tm = np.arange(Lm)
    tm[vid] = tm[vid].reshape(F, FS).T.reshape(-1)          # token-major order (positions)
    for h in range(4):
        temporal = sel.extras["best_mask_idx"][0, h] == 1
        order = tm if temporal else np.arange(Lm)
        qq, kk, vv = q[:, h:h + 1, order], k[:, h // 2:h // 2 + 1, order], v[:, h // 2:h // 2 + 1, order]
        o = refattn.attention(qq, kk, vv, mask=refattn.BlockMask(mm, block_q=1, block_k=1,
                                                                  q_len=Lm, k_len=Lm))
        back = np.empty_like(o)
        back[:, :, order] = o
        np.testing.assert_allclose(got[:, h:h + 1], back, rtol=1e-10, atol=1e-12)
    # the covering block mask holds every allowed pair, and only blocks that hold one
    tok = sel.extras["token_mask"].to_token_mask()
    cover = np.logical_or.reduceat(np.logical_or.reduceat(tok, np.arange(0, Lm, 16), axis=2),
                                   np.arange(0, Lm, 16), axis=3)
    np.testing.assert_array_equal(sel.mask.mask, cover)


def _classify_inputs(first=False, ctx=CTX):
    """Head 0 temporal (tokens match the same spatial position in every frame), head 1 spatial
    (tokens match every token of their own frame)."""
    rng = np.random.default_rng(0)
    D, Lm = 32, ctx + F * FS
    pos_emb, frame_emb = rng.standard_normal((FS, D)), rng.standard_normal((F, D))
    q = 0.1 * rng.standard_normal((1, 2, Lm, D))
    k = 0.1 * rng.standard_normal((1, 2, Lm, D))
    v = rng.standard_normal((1, 2, Lm, D))
    n, vid = np.arange(F * FS), slice(ctx, None) if first else slice(0, F * FS)
    q[0, 0, vid] += 3 * pos_emb[n % FS]
    k[0, 0, vid] += 3 * pos_emb[n % FS]
    q[0, 1, vid] += 3 * frame_emb[n // FS]
    k[0, 1, vid] += 3 * frame_emb[n // FS]
    return q, k, v


@pytest.mark.parametrize("backend,mode", [("numpy", "hunyuan"), ("numba", "hunyuan"),
                                          ("numpy", "cog"), ("numpy", "wan"), ("numba", "wan")])
def test_classification(backend, mode):
    ctx = _ctx(mode)
    q, k, v = _classify_inputs(mode == "cog", ctx)
    off = ctx if mode == "cog" else 0
    rows = tuple(range(off, off + F * FS, 5))                # video rows
    sel = refattn.select(q, k, "svg", v=v, causal=False, backend=backend,
                         **vars(_params(mode=mode, rows=rows)))
    assert sel.extras["pattern"].tolist() == [["temporal", "spatial"]]
    mse = sel.extras["mse"]
    assert mse[0, 0, 1] < mse[0, 0, 0] and mse[0, 1, 0] < mse[0, 1, 1]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_cog_sampled_text_row_makes_every_head_temporal(backend):
    """cog/attention.py:126 draws rows from the whole sequence; a text row has an all-``-inf``
    temporal softmax (NaN MSE), and ``torch.argmin`` (attention.py:184) picks the NaN: every
    head of the call is temporal, whatever its pattern."""
    q, k, v = _classify_inputs(True)
    rows = tuple(range(CTX, L, 5)) + (3,)                   # one text row among video rows
    sel = refattn.select(q, k, "svg", v=v, causal=False, backend=backend,
                         **vars(_params(True, rows=rows)))
    mse = sel.extras["mse"]
    assert np.isnan(mse[..., 1]).all() and np.isfinite(mse[..., 0]).all()
    assert sel.extras["pattern"].tolist() == [["temporal", "temporal"]]
    np.testing.assert_array_equal(sel.extras["best_mask_idx"], torch_argmin_lessornan(mse))
    # the rows drawn by default from the whole sequence (sample_max_row=None) hit text often
    hits = [s for s in range(20)
            if (default_rows(_params(True, sample_max_row=None, seed=s),
                             VideoGrid.from_params(GRID, CTX, "first")) < CTX).any()]
    assert hits


def test_choose_heads_is_torch_argmin_with_nan():
    rng = np.random.default_rng(3)
    mse = rng.integers(0, 3, (50, 4, 3)).astype(np.float64)   # ties on purpose
    mse[rng.random(mse.shape) < 0.25] = np.nan
    np.testing.assert_array_equal(choose_heads(mse), torch_argmin_lessornan(mse))
    edge = np.array([[np.nan, np.nan], [1.0, np.nan], [2.0, 2.0]])
    assert choose_heads(edge).tolist() == [0, 1, 0]


def test_masked_row_mse_brute_force():
    q, k, v = _classify_inputs()
    rows = np.array([3, 50, 50, 131])
    masks = np.stack([np.random.default_rng(1).random((4, L)) < 0.4, np.ones((4, L), bool)])
    (mse,) = svg_masked_row_mse(q, k, v, rows, masks, 0.2)
    for h in range(2):
        for m in range(2):
            err = 0.0
            for r, row in enumerate(rows):
                s = 0.2 * (k[0, h] @ q[0, h, row])
                gold = np.exp(s - s.max()) @ v[0, h] / np.exp(s - s.max()).sum()
                vis = masks[m, r]
                e = np.exp(s[vis] - s[vis].max())
                o = e @ v[0, h][vis] / e.sum()
                err += ((o - gold) ** 2).sum()
            assert mse[0, h, m] == pytest.approx(err / (4 * v.shape[-1]), rel=1e-12)
    assert mse[0, 0, 1] == pytest.approx(0.0, abs=1e-28)       # the full mask is the golden
    # a sampled row with no visible key: softmax of all -inf is NaN, so is that mask's MSE
    masks[0, 1] = False
    for backend_fn in (svg_masked_row_mse, _numba_mse()):
        (mse2,) = backend_fn(q, k, v, rows, masks, 0.2)
        assert np.isnan(mse2[..., 0]).all()
        np.testing.assert_allclose(mse2[..., 1], mse[..., 1], rtol=1e-12, atol=1e-30)


def _numba_mse():
    from refattn.core import registry

    if registry.load_backend("numba") is not None:
        pytest.skip("numba unavailable")
    return registry.dispatch("svg_masked_row_mse", "numba")


def test_sampled_rows_default_and_override():
    g = VideoGrid.from_params(GRID, CTX, "last")
    a = default_rows(_params(), g)
    assert a.shape == (64,) and a.min() >= 0 and a.max() < L
    np.testing.assert_array_equal(a, default_rows(_params(), g))                  # seeded
    assert not np.array_equal(a, default_rows(_params(seed=1), g))
    assert default_rows(_params(sample_max_row=10), g).max() < 10
    np.testing.assert_array_equal(default_rows(_params(rows=(1, 2)), g), [1, 2])


def test_wan_execution_rows_tokens():
    """wan/utils.py:29-39: ``|q - kv| <= ceil(mul * fs / 128) * 128`` or ``kv < fs``."""
    p = _params(mode="wan")
    g = VideoGrid.from_params(GRID, 0, "last")
    W = band_tokens(p, g)
    assert W == 40                                          # ceil(37.49 / 8) * 8 (floor: 32)
    sp = execution_rows(0, np.array([100]), p, g)[0]
    assert sp[100 - W: 100 + W + 1].all() and sp[:FS].all()
    assert not sp[FS:100 - W].any() and not sp[100 + W + 1:].any()


def test_variant_default_and_explicit():
    g0 = VideoGrid.from_params(GRID, 0, "last")
    from refattn.video.svg import resolve_variant

    assert resolve_variant(_params(mode="wan"), g0) == "wan"
    assert resolve_variant(_params(), VideoGrid.from_params(GRID, CTX, "last")) == "hunyuan"
    assert resolve_variant(_params(True), VideoGrid.from_params(GRID, CTX, "first")) == "cog"
    # explicit cog rules without text: pure band masks (the old text_tokens=0 behaviour)
    p = _params(mode="wan", variant="cog")
    np.testing.assert_array_equal(profile_rows(1, np.arange(F * FS), p, g0),
                                  official_profile_masks(0, F, FS, PB, True)[1])
    assert not execution_rows(0, np.array([100]), p, g0)[0, :FS].any()


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
                                dict(num_sampled_rows=0), dict(variant="wan"),
                                dict(variant="cog"), dict(variant="svg2"),
                                dict(profile_width=-1.0)])
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
