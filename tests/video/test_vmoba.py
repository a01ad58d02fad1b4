"""VMoBA: every official vector (partition, gate, every selection mode, dense fallback,
outputs, packed varlen batch), a loop-by-loop transliteration of the threshold rule,
attention over the union of blocks, the Numba gate kernel, parameter errors."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from conformance import load, vector_params

import refattn
from refattn.core.errors import InputError
from refattn.core.video_grid import PartitionTokenMask, VideoGrid
from refattn.reference.attention import attention_forward
from refattn.testing import structured_qkv
from refattn.video.vmoba import packed_cells, select_cells, vmoba_gate

CHUNK = {"1d": "temporal_chunk", "2d": "spatial_chunk", "3d": "st_chunk"}
TOPK = {"1d": "temporal_topk", "2d": "spatial_topk", "3d": "st_topk"}


def _variant_kw(var: dict) -> dict:
    return {"select_mode": var["select_mode"], "threshold_type": var["threshold_type"],
            "simsum_threshold": var["simsum_threshold"] or 0.25, "topk": var["moba_topk"] or 3}


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("path", vector_params("vmoba"))
def test_selection_on_official_gate(path):
    """`_select_threshold_*` / topk branches on the captured gate: exact, every variant."""
    z = load(path)
    p = json.loads(str(z["params"][0]))
    valid = z.get("valid_mask", np.ones_like(z["self_mask"]))
    for var in p["variants"]:
        final, _ = select_cells(z["gate"], valid, z["self_mask"], **_variant_kw(var))
        np.testing.assert_array_equal(final, z["sel__" + var["name"]], err_msg=var["name"])
        other = final & ~z["self_mask"]
        assert int(other.sum()) == var["n_selected_other"]
        assert (not other.any()) == var["dense_fallback"]


@pytest.mark.parametrize("path", vector_params("vmoba"))
def test_end_to_end(path):
    """refattn.select + refattn.attention from q, k, v: gate, masks and outputs."""
    z = load(path)
    p = json.loads(str(z["params"][0]))
    if "perm_b0" in z:
        pytest.skip("packed batch of two grids: covered by test_varlen_packed")
    part, chunk = p["partition"], p["chunk_size"]
    base = dict(grid=tuple(p["grids"][0]), partition=part,
                **{CHUNK[part]: tuple(chunk) if isinstance(chunk, list) else chunk})
    scale = np.abs(z["gate"]).max()
    for var in p["variants"]:
        kw = _variant_kw(var)
        sel = refattn.select(z["q"], z["k"], "vmoba", layout="bshd", causal=False,
                             select_mode=kw["select_mode"], threshold_type=kw["threshold_type"],
                             simsum_threshold=kw["simsum_threshold"], **{TOPK[part]: kw["topk"]}, **base)
        gate = sel.extras["gate"][0].transpose(2, 0, 1)
        np.testing.assert_allclose(gate, z["gate"], rtol=0, atol=2e-6 * scale)
        assert sel.extras["dense_fallback"] == var["dense_fallback"]
        if not var["dense_fallback"]:
            np.testing.assert_array_equal(sel.mask.mask[0].transpose(2, 0, 1), z["sel__" + var["name"]])
        if "out__" + var["name"] in z:
            out = refattn.attention(z["q"], z["k"], z["v"], mask=sel, layout="bshd")
            np.testing.assert_allclose(out, z["out__" + var["name"]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", [p for p in vector_params("vmoba") if "varlen" in str(p.values[0])]
                         or [pytest.param(None, marks=pytest.mark.skip(reason="no varlen vector"))])
def test_varlen_packed(path):
    """Two grids packed as one varlen call: cross-sequence cells invalid, groups span both."""
    z = load(path)
    p = json.loads(str(z["params"][0]))
    parts, gates = [], []
    for b, grid in enumerate(p["grids"]):
        part = VideoGrid(*grid).partition(p["partition"], p["chunk_size"])
        q = part.permute(z[f"q_b{b}"][0].transpose(1, 0, 2), axis=1)[None]
        k = part.permute(z[f"k_b{b}"][0].transpose(1, 0, 2), axis=1)[None]
        parts.append(part)
        gates.append(vmoba_gate(q, k, part.bounds)[0][0])                 # [H, S_b, C_b]
    C = [g.shape[2] for g in gates]
    S = [g.shape[1] for g in gates]
    H = gates[0].shape[0]
    packed = np.full((sum(C), H, sum(S)), -np.inf)
    packed[:C[0], :, :S[0]] = gates[0].transpose(2, 0, 1)
    packed[C[0]:, :, S[0]:] = gates[1].transpose(2, 0, 1)
    valid = np.isfinite(packed)
    np.testing.assert_array_equal(valid, z["valid_mask"])
    np.testing.assert_allclose(np.where(valid, packed, 0), np.where(valid, z["gate"], 0),
                               rtol=0, atol=2e-6 * np.abs(z["gate"][valid]).max())
    for var in p["variants"]:
        final, _ = select_cells(packed, valid, z["self_mask"], **_variant_kw(var))
        np.testing.assert_array_equal(final, z["sel__" + var["name"]], err_msg=var["name"])
        for b in range(2):
            key = f"out__{var['name']}_b{b}"
            if key not in z:
                continue
            c0, s0 = sum(C[:b]), sum(S[:b])
            rows = final[c0:c0 + C[b], :, s0:s0 + S[b]].transpose(1, 2, 0)[None]
            tm = PartitionTokenMask(parts[b], rows, "token", text_dense=False)
            q, k, v = (z[f"{n}_b{b}"].transpose(0, 2, 1, 3) for n in "qkv")
            out, _ = attention_forward(q, k, v, tm, False, None)
            np.testing.assert_allclose(out.transpose(0, 2, 1, 3), z[key], rtol=0, atol=1e-6)


# --------------------------------------------------------- rule, by transliteration
def brute_query_head(gate, valid, selfm, tau):
    """Cell-by-cell reading of spec 1(d) for threshold/query_head; lower index wins ties."""
    C, H, S = gate.shape
    out = np.zeros_like(selfm)
    for h in range(H):
        for s in range(S):
            vals = [gate[c, h, s] for c in range(C) if valid[c, h, s]]
            mn, mx = min(vals), max(vals)
            den = mx - mn if mx - mn > 1e-6 else 1.0
            gn = [(gate[c, h, s] - mn) / den if valid[c, h, s] else 0.0 for c in range(C)]
            tot = sum(gn)
            own = sum(gn[c] for c in range(C) if selfm[c, h, s])
            need = max(0.0, tau - own / (tot + 1e-6))
            others = [0.0 if selfm[c, h, s] else gn[c] for c in range(C)]
            order = sorted(range(C), key=lambda c: (-others[c], c))
            acc, take = 0.0, order
            for n, c in enumerate(order):
                acc += others[c]
                if acc / (tot + 1e-6) >= need:
                    take = order[:n + 1]
                    break
            for c in range(C):
                out[c, h, s] = valid[c, h, s] and (c in take or selfm[c, h, s])
    return out


@pytest.mark.parametrize("tau", [0.0, 0.25, 0.6, 1.0])
def test_query_head_matches_transliteration(tau):
    rng = np.random.default_rng(3)
    part = VideoGrid(3, 4, 4).partition_3d(1, 2, 2)
    gate = rng.standard_normal((part.num_blocks, 2, part.grid.seq_len))
    gate[:, 0, 5] = 1.5                                          # a flat row: denominator 1
    valid, selfm = (np.array(x) for x in packed_cells(part.bounds, part.grid.seq_len, 1, 2))
    final, boundary = select_cells(gate, valid, selfm, simsum_threshold=tau)
    np.testing.assert_array_equal(final, brute_query_head(gate, valid, selfm, tau))
    other = final & ~selfm
    assert other.any(axis=0).all()                               # >= 1 extra block per group
    assert final[selfm].all()
    # boundary: the raw gate of the crossing cell, the smallest kept non-self gate of its row
    row_min = np.where(other, gate, np.inf).min(axis=0)
    ok = np.isfinite(boundary[0])                                # nan: crossing on the self cell
    assert ok.any()
    np.testing.assert_array_equal(boundary[0][ok], row_min[ok])


def test_topk_and_dense_fallback():
    rng = np.random.default_rng(4)
    q, k, v = structured_qkv(rng, 1, 2, 1, 96, 96, 16)
    kw = dict(grid=(4, 4, 6), partition="2d", spatial_chunk=(2, 3), causal=False, select_mode="topk")
    sel = refattn.select(q, k, "vmoba", threshold_type="query_head", spatial_topk=2, **kw)
    assert (sel.mask.mask.sum(-1) == 2).all()                    # self + one other per query
    assert (sel.forced.sum(-1) == 1).all() and (sel.mask.mask >= sel.forced).all()   # self kept
    one = refattn.select(q, k, "vmoba", threshold_type="overall", spatial_topk=1, **kw)
    assert one.extras["dense_fallback"] and one.extras["token_mask"] is None and one.mask.mask.all()
    np.testing.assert_allclose(refattn.attention(q, k, v, mask=one), refattn.attention(q, k, v))


def test_token_mask_equals_permuted_block_attention():
    """Attention through extras['token_mask'] == permute, block-sparse on blocks, unpermute."""
    rng = np.random.default_rng(5)
    q, k, v = structured_qkv(rng, 2, 4, 2, 144, 144, 16)
    for layer in range(3):                                       # 1D, 2D, 3D by the cycle
        sel = refattn.select(q, k, "vmoba", grid=(4, 6, 6), layer_idx=layer, temporal_chunk=1,
                             spatial_chunk=(3, 3), st_chunk=(2, 3, 3), causal=False,
                             threshold_type="head_global")
        assert sel.extras["partition"] == ("1d", "2d", "3d")[layer]
        perm = sel.extras["perm"]
        qp, kp, vp = (x[:, :, perm] for x in (q, k, v))
        o_perm = refattn.attention(qp, kp, vp, mask=sel.mask)
        o = refattn.attention(q, k, v, mask=sel)
        np.testing.assert_allclose(o[:, :, perm], o_perm, rtol=0, atol=1e-12)


def test_numba_gate_kernel():
    """The vmoba_gate kernel through the registry harness (NaN-poisoned outputs)."""
    pytest.importorskip("numba")
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    importlib.import_module("refattn.methods").load_all()
    from test_registry import test_kernel_matches_reference
    test_kernel_matches_reference("vmoba_gate", "numba")


def test_parameter_errors():
    rng = np.random.default_rng(6)
    q, k, _ = structured_qkv(rng, 1, 2, 1, 96, 96, 16)
    ok = dict(grid=(4, 4, 6), partition="1d", temporal_chunk=1)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, k, "vmoba", causal=True, **ok)
    with pytest.raises(InputError, match="text_tokens"):
        refattn.select(q, k, "vmoba", causal=False, text_tokens=4, **ok)
    with pytest.raises(InputError, match="threshold_type"):
        refattn.select(q, k, "vmoba", causal=False, select_mode="topk", threshold_type="block", **ok)
    with pytest.raises(InputError, match="needs 97 tokens"):
        refattn.select(q, k, "vmoba", causal=False, grid=(97, 1, 1), partition="1d")
    with pytest.raises(InputError, match="grid.H"):
        refattn.select(q, k, "vmoba", causal=False, grid=(4, 4, 6), partition="2d", spatial_chunk=(3, 3))
    with pytest.raises(InputError, match="simsum_threshold"):
        refattn.select(q, k, "vmoba", causal=False, simsum_threshold=1.5, **ok)
    with pytest.raises(InputError, match="grid"):
        refattn.select(q, k, "vmoba", causal=False)


def test_memory_limit_refused():
    q = np.zeros((1, 1, 96, 4))
    refattn.set_memory_limit("500K")
    try:
        with pytest.raises(refattn.MemoryLimitError, match="vmoba selection"):
            refattn.select(q, q, "vmoba", causal=False, grid=(4, 4, 6), partition="3d", st_chunk=(1, 1, 1))
    finally:
        refattn.set_memory_limit(None)
