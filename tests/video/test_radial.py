"""Radial Attention: every official vector (block mask, windows, thinning), a transliteration
of the per-frame-pair rule and of ``shrinkMaskStrict``, the method through refattn.select /
refattn.attention, parameter errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conformance import load, vector_params

import refattn
from refattn.core.errors import InputError
from refattn.video.radial import radial_block_mask


@pytest.mark.parametrize("path", vector_params("radial"))
def test_official_vectors(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    mask, window, kept = radial_block_mask(p["num_frame"], p["token_per_frame"], p["seq_len"],
                                           p["block_size"], p["decay_factor"], p["model_type"])
    n = z["block_mask"].shape[0]                                 # official: seq_len // block
    np.testing.assert_array_equal(mask[:n, :n], z["block_mask"])
    assert mask[n:].all() and mask[:, n:].all()                  # a partial tail block is text: on
    np.testing.assert_array_equal(window, z["window_width"])
    np.testing.assert_array_equal(kept, z["pair_kept"])
    assert p["video_text_border"] == p["video_token_num"] // p["block_size"]


def brute_radial(F: int, tpf: int, bs: int, decay: float, model: str, n: int) -> np.ndarray:
    """Per frame pair: token mask from the rule, shrunk block by block with explicit loops."""
    out = np.zeros((n + 4 * F, n + 4 * F), bool)
    P = 2 ** tpf.bit_length()
    for i in range(F):
        for j in range(F):
            d = abs(i - j)
            g = d.bit_length()
            if model == "wan" and j == 0:
                local = np.ones((tpf, tpf), bool)
            else:
                w = tpf if d <= 1 else max(P / 2 ** g * decay, bs)
                lam = P / 2 ** g
                keep = lam >= 128 or d % int(128 / lam) == 0
                local = np.array([[abs(c - r) <= w and keep for c in range(tpf)] for r in range(tpf)])
            ro, co = (i * tpf) % bs, (j * tpf) % bs
            nb = -(-tpf // bs)
            canvas = np.zeros((ro + nb * bs, co + nb * bs), bool)
            canvas[ro:ro + tpf, co:co + tpf] = local
            for R in range(nb):
                for C in range(nb):
                    blk = canvas[R * bs:(R + 1) * bs, C * bs:(C + 1) * bs]
                    dens = [blk[:, x].sum() / bs for x in range(bs)]
                    hi = sum(x > 1 / 3 for x in dens)
                    nz = sum(x > 0 for x in dens)
                    if hi / (nz + 1e-9) > 0.6:
                        out[(i * tpf) // bs + R, (j * tpf) // bs + C] = True
    border = F * tpf // bs
    out[border:] = True
    out[:, border:] = True
    return out[:n, :n]


@pytest.mark.parametrize("F,tpf,bs,decay,model,text", [
    (6, 40, 32, 1.0, "wan", 0), (5, 48, 16, 0.5, "hunyuan", 10), (9, 20, 16, 1.0, "hunyuan", 0),
    (4, 100, 64, 2.0, "wan", 30)])
def test_rule_transliteration(F, tpf, bs, decay, model, text):
    L = F * tpf + text
    n = -(-L // bs)
    mask, _, _ = radial_block_mask(F, tpf, L, bs, decay, model)
    np.testing.assert_array_equal(mask, brute_radial(F, tpf, bs, decay, model, n))


def test_select_and_attention():
    rng = np.random.default_rng(0)
    grid, text = (8, 12, 20), 40                                 # tpf 240: not block aligned
    L = 8 * 240 + text
    q, k, v = (rng.standard_normal((1, 2, L, 8)) for _ in range(3))
    sel = refattn.select(q, k, "radial", causal=False, grid=grid, text_tokens=text)
    want, _, _ = radial_block_mask(8, 240, L, 128, 1.0, "wan")
    np.testing.assert_array_equal(sel.mask.mask[0, 0], want)
    assert sel.mask.shape[2] == -(-L // 128)
    tok = np.kron(want, np.ones((128, 128), bool))[:L, :L]
    out = refattn.attention(q, k, v, mask=sel)
    s = np.where(tok, q[0] @ k[0].transpose(0, 2, 1) / np.sqrt(8), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out[0], (p / p.sum(-1, keepdims=True)) @ v[0], atol=1e-12)
    dense = refattn.select(q, k, "radial", causal=False, grid=grid, text_tokens=text,
                           dense_layers=2, layer_idx=1)
    assert dense.mask.mask.all() and dense.extras["dense"]


def test_parameter_errors():
    q = np.zeros((1, 1, 64, 4))
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, q, "radial", causal=True, grid=(4, 4, 4))
    with pytest.raises(InputError, match="text_position"):
        refattn.select(q, q, "radial", causal=False, grid=(4, 3, 4), text_tokens=16, text_position="first")
    with pytest.raises(InputError, match="model_type"):
        refattn.select(q, q, "radial", causal=False, grid=(4, 4, 4), model_type="mochi")
    with pytest.raises(InputError, match="needs 48 tokens"):
        refattn.select(q, q, "radial", causal=False, grid=(4, 3, 4))
    with pytest.raises(InputError, match="decay_factor"):
        refattn.select(q, q, "radial", causal=False, grid=(4, 4, 4), decay_factor=0)
