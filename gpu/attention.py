"""CuPy launchers for block-sparse attention, forward and backward (ops ``attention_fwd``
and ``attention_bwd`` of the registry, backend ``"cupy"``).

Arrays are canonical ``bhsd``: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``,
v ``[B, Hkv, Sk, Dv]``; NumPy or CuPy (anything exposing ``__cuda_array_interface__`` or a
CUDA DLPack device arrives as CuPy through :func:`refattn.core.layout.as_array`). Results are
fp32 (``out [B, Hq, Sq, Dv]``, ``lse [B, Hq, Sq]`` natural log; ``dq``, ``dk``, ``dv`` in the
shapes of q, k, v), CuPy when q came as CuPy, NumPy when q came as NumPy.

Which kernel runs (all agree with the float64 reference within the DESIGN tolerance rule):

* bf16 / fp16, D == Dv in {64, 128}, device sm_80+:
    - dense, or a BlockMask with block_q and block_k multiples of 64: tensor-core
      flash-attention (``attn_fwd.cu`` / ``attn_bwd.cu``, mma.sync m16n8k16, fp32 accumulate
      and softmax) over the canonical index form (backward over ``BlockMask.transpose()``);
    - block_q == 1 (per-token routing, MoBA), block_k a multiple of 64: the FlashMoBA-style
      gather kernels (query rows that chose a key block are gathered into dense tiles).
* anything else (fp32 inputs, other head dims or block sizes): ``attn_rowwise.cu``, one warp
  per query row, exact fp32 FFMA (no tf32). float64 inputs are computed as float32.
* Hopper (sm_90), forward, unless ``REFATTN_WGMMA=0`` (on by default since it passed the
  GPU tests and measured 1.4-1.6x FlexAttention at S = 32768; docs/gpu_notes.md): dense, or block_q % 128 == 0 and block_k % 64 == 0,
  D == Dv in {64, 128}, 16-bit inputs: ``attn_fwd_wgmma.cu`` (wgmma + TMA, warp-specialised,
  compiled for sm_90a), over the same index form; anything it cannot take, or a failure to
  build it, falls back to the mma.sync kernel.
* Hopper (sm_90), per-token routing forward (block_q == 1), when ``REFATTN_MOBA_WGMMA``
  (default :data:`MOBA_WGMMA_DEFAULT`, "0" until the device probe passes) is not "0":
  16-bit inputs, D == Dv in {64, 128}, block_k in {64, 128}: ``attn_gather_wgmma.cu``
  (wgmma + TMA, the key block held in shared memory while gathered query tiles stream
  through, 16-bit partials, ``attn_combine_part``); anything else, or a failure to build
  it, stays on the mma.sync gather kernels.
* Hopper (sm_90), backward, when ``REFATTN_WGMMA_BWD`` (default :data:`WGMMA_BWD_DEFAULT`) is
  not "0": dense, or block_q % 64 == 0 and block_k % 128 == 0, D == Dv == 128, 16-bit inputs:
  ``attn_bwd_wgmma.cu`` (wgmma + TMA, warp-specialised, sm_90a) over the transposed index
  form; anything else, or a failure to build it, falls back to the mma.sync backward.

Causal is bottom-right aligned. A row that sees no key gets output 0 and LSE -inf.

Modules (private ones start with ``_``; every name below stays importable from here):

* this module: the public :func:`attention_fwd` / :func:`attention_bwd`, the choice of path
  (:func:`_path`, the wgmma switches and fall back), the mma.sync block and rowwise
  launches, and the mma.sync tile tunables :data:`FWD_TILES`, :data:`GATHER_BM`,
  :data:`BWD_BN` (read here at each call, so rebinding them on this module takes effect);
* ``_attn_common.py``: arrays (``_Dev``, ``_to_device``, ``_kernel_ready``, ``_cast``), shapes
  (``_shape``), outputs (``_check_out``, ``_deliver``) and the device-side mask caches
  (``_cached``, ``_index_args``, ``_prepare``);
* ``_attn_gather.py``: per-token routing (``_gather_plan``, the gather launches, and the
  Hopper wgmma gather forward ``fwd_gather_wgmma``, called here as ``_fwd_gather_wgmma``
  through this module's globals, with its switch and ``MOBA_WGMMA_CONFIG``);
* ``_attn_wgmma.py``: the Hopper wgmma forward and backward, their switches, tunables
  (``WGMMA_CONFIG``, ``WGMMA_BWD_CONFIG``, dicts changed in place) and tensor maps.
  ``_fwd_wgmma`` / ``_bwd_wgmma`` are called through this module's globals, so wrapping
  them with ``monkeypatch.setattr(attention, ...)`` takes effect.

State re-exported from the helper modules (``_CACHE``, ``_TMAPS``, ``WGMMA_CONFIG``,
``WGMMA_BWD_CONFIG``, ``_WGMMA_BROKEN``, ``_WGMMA_BWD_BROKEN``) is the same object here and
there: change it in place (``.clear()``, ``.update()``, ``monkeypatch.setitem``), do not rebind.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.blockmask import BlockMask
from refattn.core.errors import InputError
from refattn.core.layout import AttnShape

from ._attn_common import (  # noqa: F401  (re-exported: tests and scripts use them from here)
    _CACHE,
    _CACHE_SIZE,
    _CT,
    _NULL,
    LOG2E,
    _cached,
    _cast,
    _check_out,
    _deliver,
    _Dev,
    _dtype_name,
    _epl,
    _f32,
    _index_args,
    _kernel_ready,
    _prepare,
    _shape,
    _strides,
    _to_device,
)
from ._attn_gather import (  # noqa: F401  (re-exported: tests and scripts use them from here)
    _MOBA_WGMMA_BROKEN,
    MOBA_WGMMA_CONFIG,
    MOBA_WGMMA_DEFAULT,
    _gather_plan,
    _moba_wgmma_fits,
    bwd_gather,
    fwd_gather,
    moba_wgmma_enabled,
    moba_wgmma_kernel,
    moba_wgmma_smem,
)
from ._attn_gather import fwd_gather_wgmma as _fwd_gather_wgmma  # noqa: F401
from ._attn_wgmma import (  # noqa: F401  (re-exported: tests and scripts use them from here)
    _TMAP_DTYPE,
    _TMAPS,
    _WGMMA_BROKEN,
    _WGMMA_BWD_BROKEN,
    WGMMA_BWD_CONFIG,
    WGMMA_BWD_DEFAULT,
    WGMMA_CONFIG,
    WGMMA_DEFAULT,
    _bwd_wgmma,
    _encode_fn,
    _fwd_wgmma,
    _tensor_maps,
    _tensor_maps_boxes,
    _wgmma_bwd_fits,
    _wgmma_fits,
    tensor_map,
    wgmma_bwd_enabled,
    wgmma_bwd_kernel,
    wgmma_bwd_smem,
    wgmma_enabled,
    wgmma_kernel,
    wgmma_smem,
)
from ._build import get_kernel, launch, tensor_cores_available

#: Forward tile (BM query rows, BN keys) per head dim for masks whose block_q is a multiple
#: of 128 (and for dense); 4 warps, 32 rows each. Masks with block_q % 128 != 0 (but % 64 == 0)
#: use (64, 64). docs/gpu_notes.md has the measurements behind the choice.
FWD_TILES: dict[int, tuple[int, int]] = {64: (128, 64), 128: (128, 64)}

#: Gathered query rows per CTA in the per-token-routing (block_q = 1) forward.
GATHER_BM = 128
#: Keys per CTA in the backward (8 warps); 64 (4 warps) where the mask's block_k is not a
#: multiple of it. Larger tiles halve the dQ atomics per FLOP (docs/gpu_notes.md).
BWD_BN = 128


def _path(q: _Dev, shape: AttnShape, mask: BlockMask | None) -> str:
    """``"block"`` (tensor cores, index form), ``"gather"`` (tensor cores, per-token routing)
    or ``"rowwise"`` (SIMT fp32)."""
    tc = (q.kind in ("float16", "bfloat16") and shape.head_dim == shape.v_dim
          and shape.head_dim in (64, 128) and tensor_cores_available())
    if not tc:
        return "rowwise"
    if mask is None:
        return "block"
    if mask.block_k % 64:
        return "rowwise"
    if mask.block_q % 64 == 0:
        return "block"
    if mask.block_q == 1:
        return "gather"
    return "rowwise"


# ----------------------------------------------------------------------------- forward
def attention_fwd(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = False,
                  scale: float | None = None, *, out: tuple[Any, Any] | None = None
                  ) -> tuple[Any, Any]:
    """Block-sparse attention forward on the GPU.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` (bf16, fp16, fp32;
    fp64 is computed as fp32); ``mask`` a :class:`BlockMask` or None (dense); ``causal``
    bottom-right aligned; ``scale`` defaults to ``1/sqrt(D)``. Returns ``out fp32
    [B, Hq, Sq, Dv]`` and ``lse fp32 [B, Hq, Sq]`` (natural log), written into ``out=`` when
    given (float32/float64 arrays of the kind of q: NumPy or CuPy).
    """
    host = isinstance(q, np.ndarray)
    qd, kd, vd = (_kernel_ready(_to_device(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    shape = _shape(qd, kd, vd)
    B, Hq, Hkv, Sq, Sk, D, Dv = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                                 shape.k_len, shape.head_dim, shape.v_dim)
    out = _check_out(out, ((B, Hq, Sq, Dv), (B, Hq, Sq)), ("out", "lse"), host)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"scale: expected a finite positive number, got {scale!r}")
    m = _prepare(mask, shape)
    path = _path(qd, shape, m)
    o = cp.empty((B, Hq, Sq, Dv), cp.float32)
    lse = cp.empty((B, Hq, Sq), cp.float32)
    sl2 = np.float32(scale * LOG2E)
    cz = np.int32(bool(causal))
    strides = _strides(qd, kd, vd)
    T = _CT.get(qd.kind)

    if path == "rowwise":
        if m is None:
            idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                        np.int32(0))
            bq, bk = 1, 64
        else:
            idx_args = _index_args(m, transpose=False)
            bq, bk = m.block_q, m.block_k
        fn = get_kernel("attn_rowwise.cu", f"attn_fwd_rowwise<{T}, {_epl(shape)}>")
        launch(fn, (-(-Sq // 4), Hq, B), (128,),
               (qd.raw, kd.raw, vd.raw, o, lse) + strides +
               (np.int32(D), np.int32(Dv), np.int32(Hq), np.int32(Hkv), np.int32(Sq),
                np.int32(Sk), sl2, cz) + idx_args + (np.int32(bq), np.int32(bk)))
        return _deliver((o, lse), out, host)

    elem = 2
    if path == "block" and wgmma_enabled() and _wgmma_fits(qd, shape, m):
        try:
            _fwd_wgmma(qd, kd, vd, shape, m, o, lse, sl2, cz)
            return _deliver((o, lse), out, host)
        except ValueError:  # a geometry TMA cannot describe: this call only
            pass
        except Exception as e:  # build or driver failure: stay on the mma.sync kernel
            _WGMMA_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"refattn: the wgmma forward is unavailable ({type(e).__name__}: {e}); "
                          "using the mma.sync kernel", RuntimeWarning, stacklevel=2)
    if path == "block":
        if m is None or m.block_q % 128 == 0:
            BM, BN = FWD_TILES[D]
        else:
            BM, BN = 64, 64
        if m is None:
            idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                        np.int32(0))
            bq, bk = BM, 64
        else:
            idx_args = _index_args(m, transpose=False)
            bq, bk = m.block_q, m.block_k
        fn = get_kernel("attn_fwd.cu", f"attn_fwd_block<{T}, {D}, {BM}, {BN}>")
        smem = (BM * (D + 8) + 4 * BN * (D + 8)) * elem + BM * 4
        launch(fn, (-(-Sq // BM), Hq, B), (128,),
               (qd.raw, kd.raw, vd.raw, o, lse) + strides +
               (np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), sl2, cz) + idx_args +
               (np.int32(bq), np.int32(bk), _NULL, _NULL, _NULL, _NULL, _NULL, _NULL,
                np.int32(0)), smem)
        return _deliver((o, lse), out, host)

    # gather (per-token routing, block_q = 1)
    if moba_wgmma_enabled() and _moba_wgmma_fits(qd, shape, m):
        try:
            _fwd_gather_wgmma(qd, kd, vd, shape, m, o, lse, sl2, cz)
            return _deliver((o, lse), out, host)
        except ValueError:  # a geometry TMA cannot describe: this call only
            pass
        except Exception as e:  # build or driver failure: stay on the mma.sync gather
            _MOBA_WGMMA_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"refattn: the wgmma per-token-routing forward is unavailable "
                          f"({type(e).__name__}: {e}); using the mma.sync gather kernels",
                          RuntimeWarning, stacklevel=2)
    fwd_gather(qd, kd, vd, shape, m, o, lse, sl2, cz, GATHER_BM)
    return _deliver((o, lse), out, host)


# ----------------------------------------------------------------------------- backward
def attention_bwd(q: Any, k: Any, v: Any, o: Any, do: Any, lse: Any, mask: Any = None,
                  causal: bool = False, scale: float | None = None, *,
                  out: tuple[Any, Any, Any] | None = None) -> tuple[Any, Any, Any]:
    """Block-sparse attention backward on the GPU.

    q, k, v as :func:`attention_fwd`; ``o`` ``[B, Hq, Sq, Dv]`` and ``lse`` ``[B, Hq, Sq]`` the
    forward's outputs, ``do`` the output gradient ``[B, Hq, Sq, Dv]`` (on the tensor-core path
    it is rounded to q's dtype, as FlashAttention does). Returns fp32 ``dq [B, Hq, Sq, D]``,
    ``dk [B, Hkv, Sk, D]``, ``dv [B, Hkv, Sk, Dv]`` (dk, dv summed over each GQA group); the
    key blocks of each query block come from the mask's transposed index form.
    """
    host = isinstance(q, np.ndarray)
    qd, kd, vd = (_kernel_ready(_to_device(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    shape = _shape(qd, kd, vd)
    B, Hq, Hkv, Sq, Sk, D, Dv = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                                 shape.k_len, shape.head_dim, shape.v_dim)
    out = _check_out(out, ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)),
                     ("dq", "dk", "dv"), host)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"scale: expected a finite positive number, got {scale!r}")
    od = _to_device(o, "o")
    dod = _to_device(do, "do")
    for nm, x in (("o", od), ("do", dod)):
        if x.shape != (B, Hq, Sq, Dv):
            raise InputError(f"{nm}: expected shape {(B, Hq, Sq, Dv)}, got {x.shape}")
    lse32 = _f32(lse, "lse")
    if lse32.shape != (B, Hq, Sq):
        raise InputError(f"lse: expected shape {(B, Hq, Sq)}, got {tuple(lse32.shape)}")
    m = _prepare(mask, shape)
    path = _path(qd, shape, m)
    o32 = _cast(od, "float32").raw
    T = _CT.get(qd.kind)
    strides = _strides(qd, kd, vd)
    cz = np.int32(bool(causal))
    rows = B * Hq * Sq

    if path == "rowwise":
        do32 = _cast(dod, "float32").raw
    else:
        do16 = _cast(dod, qd.kind)
        do32 = _cast(do16, "float32").raw  # Delta from the dO the tensor cores see
    delta = cp.empty((B, Hq, Sq), cp.float32)
    launch(get_kernel("attn_rowwise.cu", "row_dot"), (-(-rows // 8),), (256,),
           (do32, o32, delta, np.int64(rows), np.int32(Dv)))

    if path == "rowwise":
        dq = cp.empty((B, Hq, Sq, D), cp.float32)
        dk = cp.zeros((B, Hkv, Sk, D), cp.float32)
        dv = cp.zeros((B, Hkv, Sk, Dv), cp.float32)
        if m is None:
            idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                        np.int32(0))
            bq, bk = 1, 64
        else:
            idx_args = _index_args(m, transpose=False)
            bq, bk = m.block_q, m.block_k
        fn = get_kernel("attn_rowwise.cu", f"attn_bwd_rowwise<{T}, {_epl(shape)}>")
        launch(fn, (-(-Sq // 4), Hq, B), (128,),
               (qd.raw, kd.raw, vd.raw, do32, lse32, delta, dq, dk, dv) + strides +
               (np.int32(D), np.int32(Dv), np.int32(Hq), np.int32(Hkv), np.int32(Sq),
                np.int32(Sk), np.float32(scale), cz) + idx_args + (np.int32(bq), np.int32(bk)))
        return _deliver((dq, dk, dv), out, host)

    dq = cp.zeros((B, Hq, Sq, D), cp.float32)
    dk = cp.empty((B, Hkv, Sk, D), cp.float32)
    dv = cp.empty((B, Hkv, Sk, Dv), cp.float32)
    if path == "block" and wgmma_bwd_enabled() and _wgmma_bwd_fits(qd, shape, m):
        try:
            _bwd_wgmma(qd, kd, vd, do16, shape, m, lse32, delta, dq, dk, dv, scale, cz)
            return _deliver((dq, dk, dv), out, host)
        except ValueError:  # a geometry TMA cannot describe: this call only
            pass
        except Exception as e:  # build or driver failure: stay on the mma.sync kernel
            _WGMMA_BWD_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"refattn: the wgmma backward is unavailable ({type(e).__name__}: "
                          f"{e}); using the mma.sync kernel", RuntimeWarning, stacklevel=2)
        dq.fill(0)
    BN = BWD_BN if (m is None or m.block_k % BWD_BN == 0) else 64
    smem = ((2 * BN + 2 * 64) * (D + 8) + BN * 72) * 2 + 2 * 64 * 12
    common = ((qd.raw, kd.raw, vd.raw, do16.raw, lse32, delta, dq, dk, dv) + strides +
              (np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), np.float32(scale),
               np.float32(scale * LOG2E), cz))
    grid = (-(-Sk // BN), Hkv, B)
    block = (BN * 2,)
    if path == "block":
        if m is None:
            t_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                      np.int32(0), np.int32(64), np.int32(BN))
        else:
            t_args = _index_args(m, transpose=True) + (np.int32(m.block_q), np.int32(m.block_k))
        fn = get_kernel("attn_bwd.cu", f"attn_bwd_block<{T}, {D}, {BN}>")
        launch(fn, grid, block, common + t_args + (_NULL, _NULL, _NULL, np.int32(0)), smem)
    else:
        bwd_gather(m, shape, T, BN, grid, block, common, smem, GATHER_BM)
    return _deliver((dq, dk, dv), out, host)
