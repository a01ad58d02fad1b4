"""XAttention ``path="torch"``: ``xattn_estimate``'s torch branch (taken when the GPU name
lacks "100", Xattention.py L57-63) against a line-by-line NumPy transliteration of the
official code (mit-han-lab/x-attention @ e3798877, ``xattn/src/Xattention.py`` L29-299),
including the ``causal_mask[..., -k_reshaped_num_to_pad:]`` slice (L201) and the rounding
to float16/bfloat16 at each step; ``path="triton"`` unchanged; backends; parameter errors."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.methods import xattention as X

BF16 = np.dtype(ml_dtypes.bfloat16)


def _official_torch_branch(query_states, key_states, block_size, stride, norm, threshold,
                           chunk_size, causal):
    """``xattn_estimate(..., select_mode="inverse", use_triton=False, kdb=1)``, statement by
    statement (torch ops in NumPy). Half inputs: every op's result is computed in float32
    (torch's opmath) and stored in the input dtype; ``x / s`` by a Python scalar is CUDA's
    ``x * (1/s)`` in float32. Returns ``(attn_sums, simple_masks, chunk masks)``."""
    dtype = query_states.dtype
    half = dtype in (np.float16, BF16)

    def out(x):  # a torch op on `dtype` tensors: opmath result stored in `dtype`
        return x.astype(np.float32).astype(dtype).astype(np.float64) if half else x

    def div(x, s):  # tensor / python scalar on CUDA
        if half:
            return out(x * float(np.float32(1.0) / np.float32(s)))
        return x / s

    batch_size, num_kv_head, k_len, head_dim = key_states.shape
    batch_size, num_q_head, q_len, head_dim = query_states.shape
    assert num_q_head == num_kv_head

    k_num_to_pad = ((k_len + chunk_size - 1) // chunk_size) * chunk_size - k_len
    q_num_to_pad = ((q_len + chunk_size - 1) // chunk_size) * chunk_size - q_len
    k_chunk_num = (k_len + k_num_to_pad) // chunk_size
    k_block_num = (k_len + k_num_to_pad) // block_size
    q_chunk_num = (q_len + q_num_to_pad) // chunk_size
    q_block_num = (q_len + q_num_to_pad) // block_size
    assert k_chunk_num >= q_chunk_num
    offset_token_chunk_num = k_chunk_num - q_chunk_num

    pad_key_states = np.pad(key_states.astype(np.float64), ((0, 0), (0, 0), (0, k_num_to_pad), (0, 0)))
    pad_query_states = np.pad(query_states.astype(np.float64), ((0, 0), (0, 0), (0, q_num_to_pad), (0, 0)))

    attn_sum_list = []
    simple_mask_list = []

    reshaped_chunk_size = chunk_size // stride
    reshaped_block_size = block_size // stride
    k_reshaped_num_to_pad = k_num_to_pad // stride
    k_reshaped_seq_len = (k_len + k_num_to_pad) // stride
    q_reshaped_num_to_pad = q_num_to_pad // stride
    num_blocks_per_chunk = reshaped_chunk_size // reshaped_block_size
    reshaped_key = np.concatenate(
        [(pad_key_states[:, :, k::stride, :]) for k in range(stride)], axis=-1)
    reshaped_query = np.concatenate(
        [(pad_query_states[:, :, (stride - 1 - q)::stride, :]) for q in range(stride)], axis=-1)
    assert reshaped_key.shape[-2] == k_reshaped_seq_len

    for chunk_idx in range(q_chunk_num):
        chunked_query = reshaped_query[
            :, :, (chunk_idx * reshaped_chunk_size):(chunk_idx * reshaped_chunk_size + reshaped_chunk_size), :]
        attn_weights_slice = out(np.matmul(chunked_query, reshaped_key.transpose(0, 1, 3, 2)))

        attn_weights_slice = div(div(div(attn_weights_slice, math.sqrt(head_dim)), stride), norm)

        if causal:
            causal_mask = np.zeros(
                (batch_size, num_q_head, reshaped_chunk_size, reshaped_chunk_size * k_chunk_num),
                dtype=np.float32)
            causal_mask[:, :, :, (-k_reshaped_num_to_pad):] = float("-inf")
            chunk_start = (chunk_idx + offset_token_chunk_num) * reshaped_chunk_size
            chunk_end = chunk_start + reshaped_chunk_size
            causal_mask[:, :, :, chunk_start:chunk_end] = np.triu(
                np.ones((1, num_q_head, reshaped_chunk_size, reshaped_chunk_size)) * float("-inf"),
                k=1)

            if chunk_idx == q_chunk_num - 1 and q_reshaped_num_to_pad != 0:
                causal_mask[:, :, (-q_reshaped_num_to_pad):, :] = float("-inf")

            causal_mask[:, :, :, chunk_end:] = float("-inf")
            attn_weights_slice = attn_weights_slice + causal_mask   # float32 promotion: exact

        # F.softmax(x, dim=-1, dtype=torch.float32).to(pad_query_states.dtype)
        with np.errstate(invalid="ignore"):
            e = np.exp(attn_weights_slice - attn_weights_slice.max(axis=-1, keepdims=True))
            attn_weights_slice = out(e / e.sum(axis=-1, keepdims=True))

        if chunk_idx == q_chunk_num - 1 and q_reshaped_num_to_pad != 0:
            attn_weights_slice[:, :, (-q_reshaped_num_to_pad):, :] = 0

        attn_sum = out(out(attn_weights_slice.reshape(
            batch_size, num_kv_head, num_blocks_per_chunk, reshaped_block_size, -1,
            reshaped_block_size).sum(axis=-1)).sum(axis=-2))

        simple_mask = X.find_blocks_chunked(
            attn_sum, k_block_num - q_block_num + chunk_idx * num_blocks_per_chunk,
            X.head_thresholds(threshold, num_q_head), causal)
        attn_sum_list.append(attn_sum)
        simple_mask_list.append(simple_mask)

    attn_sums = np.concatenate(attn_sum_list, axis=-2)
    chunks = np.concatenate(simple_mask_list, axis=-2)
    simple_masks = chunks.copy()
    if causal:
        simple_masks[:, :, -q_block_num:, -q_block_num:] = np.where(
            np.tril(np.ones((q_block_num, q_block_num), dtype=bool)),
            simple_masks[:, :, -q_block_num:, -q_block_num:], False)
    return attn_sums, simple_masks, chunks


def _qk(seed, L, Hq, Hkv, D, dtype, grid=False):
    """Structured q, k (a sink key, a local diagonal). ``grid``: values on a 1/8 grid, so
    every dot product is exact in float64 whatever the summation order."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, Hq, L, D)) * 0.7
    k = rng.standard_normal((1, Hkv, L, D))
    k[:, :, 0] += 2.0
    q += 0.5
    k += 0.5 * q[:, ::Hq // Hkv]
    if grid:
        q, k = np.round(q * 4) / 8, np.round(k * 4) / 8
    return q.astype(dtype), k.astype(dtype)


# (L, chunk_size, stride): chunks, tile padding (Lp - L) // stride
CASES = [
    (256, 256, 8),    # 1 chunk, padding 0 (the [-0:] slice, harmless with one chunk)
    (200, 256, 8),    # 1 chunk, padding 7 tiles
    (512, 256, 8),    # 2 chunks, padding 0: the quirk
    (765, 256, 4),    # 3 chunks, 3 padded tokens < stride: padding 0 tiles, the quirk
    (500, 256, 8),    # 2 chunks, padding 1 tile: no quirk
    (400, 128, 16),   # 4 chunks, padding 7 tiles, stride 16
]
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), BF16, np.dtype(np.float16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("L,C,S", CASES)
def test_matches_official_torch_branch(L, C, S, dtype):
    Hq, Hkv, D, bs, tau = 4, 2, 32, 64, 0.9
    grid = dtype in (BF16, np.float16)
    q, k = _qk(L + S, L, Hq, Hkv, D, dtype, grid=grid)
    sel = refattn.select(q, k, "xattention", block_size=bs, stride=S, chunk_size=C,
                         threshold=tau, path="torch")
    W, mask, chunks = _official_torch_branch(q, np.repeat(k, Hq // Hkv, axis=1), bs, S, 1,
                                             tau, C, True)
    if grid:        # exact dot products: every later rounding is reproduced bit for bit
        np.testing.assert_array_equal(sel.extras["W_padded"], W)
    else:
        np.testing.assert_allclose(sel.extras["W_padded"], W, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(sel.extras["mask_padded"], mask)
    np.testing.assert_array_equal(sel.extras["mask_chunks"], chunks)
    n = -(-L // bs)
    np.testing.assert_array_equal(sel.mask.mask, mask[:, :, :n, :n])
    if grid:        # the stored W holds values of the input dtype (the official attn_sums)
        assert np.array_equal(W.astype(dtype).astype(np.float64), W)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=lambda d: d.name)
def test_half_precision_on_gaussian_inputs(dtype):
    """Inexact dot products: the summation order may move a logit by one half ulp at most
    once in a while; W agrees to one ulp of the dtype and the masks agree."""
    L, C, S, Hq, Hkv, D = 640, 256, 8, 2, 1, 64
    q, k = _qk(21, L, Hq, Hkv, D, dtype)
    sel = refattn.select(q, k, "xattention", block_size=64, stride=S, chunk_size=C, path="torch")
    W, mask, _ = _official_torch_branch(q, np.repeat(k, Hq, axis=1), 64, S, 1, 0.9, C, True)
    ulp = 2.0 ** -7 if dtype == BF16 else 2.0 ** -10
    np.testing.assert_allclose(sel.extras["W_padded"], W, rtol=ulp, atol=0)
    np.testing.assert_array_equal(sel.extras["mask_padded"], mask)


@pytest.mark.parametrize("L,C", [(256, 128), (300, 128)])
def test_non_causal_matches_official_torch_branch(L, C):
    q, k = _qk(3, L, 2, 2, 16, BF16, grid=True)
    sel = refattn.select(q, k, "xattention", block_size=32, stride=4, chunk_size=C,
                         causal=False, path="torch")
    W, mask, _ = _official_torch_branch(q, k, 32, 4, 1, 0.9, C, False)
    np.testing.assert_array_equal(sel.extras["W_padded"], W)
    np.testing.assert_array_equal(sel.extras["mask_padded"], mask)


def test_norm_and_per_head_threshold():
    q, k = _qk(4, 300, 2, 1, 16, BF16, grid=True)
    sel = refattn.select(q, k, "xattention", block_size=32, stride=8, chunk_size=64, norm=3.0,
                         threshold=[0.5, 0.95], path="torch")
    W, mask, _ = _official_torch_branch(q, np.repeat(k, 2, axis=1), 32, 8, 3.0, [0.5, 0.95],
                                        64, True)
    np.testing.assert_array_equal(sel.extras["W_padded"], W)
    np.testing.assert_array_equal(sel.extras["mask_padded"], mask)


def test_scalar_division_is_a_float32_reciprocal_multiply():
    """float16, D = 32: a logit of 18.578125 divided by sqrt(32) rounds to different float16
    values as ``x * f32(1/f32(sqrt 32))`` (CUDA, divisor a CPU scalar) and as ``x / sqrt 32``;
    with stride = block = 2 that one tile is its own block, so W shows which was used."""
    q = np.zeros((1, 1, 4, 32), np.float16)
    k = np.zeros((1, 1, 4, 32), np.float16)
    q[0, 0, 3, 0], k[0, 0, 0, 0] = 18.578125, 1.0     # tile (1, 0): Q[3] . K[0]
    sel = refattn.select(q, k, "xattention", block_size=2, stride=2, chunk_size=4, path="torch")
    W, mask, _ = _official_torch_branch(q, k, 2, 2, 1, 0.9, 4, True)
    np.testing.assert_array_equal(sel.extras["W_padded"], W)
    # by hand: logit 3.283203125 (reciprocal) vs 3.28515625 (true division), / stride 2,
    # softmax over tiles {0, 1} of row 1: P(1, 1) = 0.16223 vs 0.16211 in float16
    assert W[0, 0, 1, 1] == float(np.float16(0.1622314453125)) != float(np.float16(0.162109375))


# ------------------------------------------------------------------ the [-0:] quirk
def test_quirk_masks_keys_before_the_chunk_only_when_tile_padding_is_zero():
    bs, C, S = 64, 256, 8
    R = C // bs
    for L, quirk in ((512, True), (509, True), (500, False)):   # padding 0, 3 < S, 12 tokens
        q, k = _qk(5, L, 2, 2, 32, np.float64)
        tor = refattn.select(q, k, "xattention", block_size=bs, stride=S, chunk_size=C, path="torch")
        tri = refattn.select(q, k, "xattention", block_size=bs, stride=S, chunk_size=C)
        Wt, Wr = tor.extras["W_padded"], tri.extras["W_padded"]
        # first chunk: the same causal softmax on both paths
        np.testing.assert_allclose(Wt[..., :R, :], Wr[..., :R, :], rtol=1e-12, atol=1e-15)
        if quirk:   # second chunk: no mass before the chunk, all of it inside
            assert (Wt[..., R:, :R] == 0).all() and (Wr[..., R:, :R] > 0).all()
            np.testing.assert_allclose(Wt[..., R:, :].sum(-1), Wr[..., R:, :].sum(-1), rtol=1e-12)
            assert (tor.mask.mask != tri.mask.mask).any()
        else:       # float64, no quirk: the paths agree
            np.testing.assert_allclose(Wt, Wr, rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(tor.mask.mask, tri.mask.mask)


def test_gqa_equals_expanded_kv():
    q, k = _qk(6, 512, 4, 2, 16, BF16)
    a = refattn.select(q, k, "xattention", block_size=64, chunk_size=128, path="torch")
    b = refattn.select(q, np.repeat(k, 2, axis=1), "xattention", block_size=64, chunk_size=128,
                       path="torch")
    np.testing.assert_array_equal(a.extras["W_padded"], b.extras["W_padded"])
    np.testing.assert_array_equal(a.mask.mask, b.mask.mask)


# ---------------------------------------------------------------- triton path, backends
def test_triton_path_is_the_default_and_unchanged():
    q, k = _qk(7, 500, 2, 1, 32, np.float32)
    kw = dict(block_size=64, stride=8, chunk_size=256)
    a = refattn.select(q, k, "xattention", **kw)
    b = refattn.select(q, k, "xattention", path="triton", **kw)
    assert X.XAttentionParams().path == "triton" and a.params["path"] == "triton"
    (W,) = X.xattention_score(q, k, 64, 8, 256, 1.0, True)
    np.testing.assert_array_equal(a.extras["W_padded"], W)
    np.testing.assert_array_equal(b.extras["W_padded"], W)
    np.testing.assert_array_equal(a.mask.mask, b.mask.mask)


@pytest.mark.parametrize("backend", ["numba", "auto", "cupy"])
def test_torch_path_runs_on_the_host_for_every_backend(backend, monkeypatch):
    why = registry.load_backend(backend) if backend != "auto" else None
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    q, k = _qk(8, 512, 2, 1, 32, np.float16)
    kw = dict(block_size=64, stride=8, chunk_size=256, path="torch")
    ref = refattn.select(q, k, "xattention", **kw)
    if backend == "cupy":           # device inputs: W is computed on the host, then moved
        import cupy
        q, k = cupy.asarray(q), cupy.asarray(k)

    def no_kernel(*a, **k):
        raise AssertionError("path='torch' must not dispatch the Triton-path scoring op")

    for b in ("numpy", "numba", "cupy"):
        monkeypatch.setitem(registry._IMPLS, ("xattention_score", b), no_kernel)
    got = refattn.select(q, k, "xattention", backend=backend, **kw)
    mask = got.mask.mask
    mask = mask.get() if hasattr(mask, "get") else mask
    np.testing.assert_array_equal(mask, ref.mask.mask)


def test_parameter_errors():
    q, k = _qk(9, 128, 2, 1, 16, BF16)
    with pytest.raises(InputError, match="path"):
        refattn.select(q, k, "xattention", path="cuda")
    with pytest.raises(InputError, match="one dtype"):
        refattn.select(q, k.astype(np.float32), "xattention", path="torch")
    with pytest.raises(InputError, match="backend"):
        refattn.select(q, k, "xattention", path="torch", backend="tpu")


def test_refuses_work_over_the_memory_limit():
    q, k = _qk(10, 1024, 1, 1, 16, np.float32)
    refattn.set_memory_limit(50_000)
    try:
        with pytest.raises(refattn.MemoryLimitError, match="xattention_score_torch"):
            refattn.select(q, k, "xattention", path="torch")
    finally:
        refattn.set_memory_limit(None)
