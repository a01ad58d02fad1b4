"""XAttention's torch branch of ``xattn_estimate`` (``use_triton=False``), emulated in NumPy.

Official code: ``xattn/src/Xattention.py`` @ e37988770b9d1bebd489eba011d615f35587ba08.
``xattn_estimate`` turns ``use_triton`` off unless the GPU's name contains "100" (L57-63),
so on every other device (H200, RTX, ...) the block scores come from this branch
(L71-136 reshape, L174-252 per query chunk). It differs from the Triton path in two ways:

* **The causal mask's ``[-0:]`` slice** (L201): ``causal_mask[..., -k_reshaped_num_to_pad:]
  = -inf`` with ``k_reshaped_num_to_pad = k_num_to_pad // stride == 0`` (the padding to the
  chunk multiple is shorter than one tile, e.g. ``L`` a multiple of ``chunk_size``) masks
  *every* key tile. L204 then opens the current chunk's lower triangle again, so with one
  chunk nothing changes, but from the second chunk on every key before the chunk is masked:
  those rows see only their own chunk.
* **Half-precision arithmetic.** For a float16/bfloat16 input every step is stored in the
  input dtype: the matmul (L182), each of the three divisions (L187-189), the softmax output
  (L228-230, computed in float32) and both block sums (L240-252).

For float16/bfloat16 inputs the emulation computes each torch op exactly in float64 and
rounds its result as CUDA does: to the op's ``opmath`` type float32, then to the input dtype
(see :func:`_store`). Details:

* matmul: exact dot products, rounded to float32 then to the input dtype (cuBLAS with fp32
  accumulation; the accumulation order of cuBLAS is not reproduced, only its rounding to
  the output dtype);
* ``x / s`` with a Python scalar ``s``: CUDA's ``div_true_kernel_cuda`` computes
  ``x * (1 / s)`` in opmath when the divisor is a CPU scalar
  (``aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu``), so ``inv = f32(1) / f32(s)``,
  then ``f32(x * inv)``, then the input dtype;
* the mask (float32 zeros / -inf) is added to the half logits, which promotes them to
  float32 exactly; ``F.softmax(..., dtype=float32)`` runs in float32 (emulated in float64,
  rounded to float32) and ``.to(dtype)`` rounds again;
* each of the two ``.sum`` calls accumulates in float32 and stores the input dtype.

float32 and float64 inputs are computed in float64 throughout, like the rest of the
reference: rounding to float32 where torch computes in float32 (matmul, divisions, the
softmax, the sums) moved ``W`` by at most 1e-6 and changed no block of 6837 selected ones on
the five conformance inputs and three synthetic L=4096 inputs (two chunks), so it is not
emulated. The result is fed to the same ``find_blocks_chunked`` as the Triton path's (it
upcasts W to float64, as the official selector does).
"""
from __future__ import annotations

import math

import numpy as np

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..reference.memory import rows_per_chunk

DTYPES = ("float64", "float32", "float16", "bfloat16")
HALF = ("float16", "bfloat16")


def _store(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    """A torch op's exact (float64) result ``x`` on tensors of dtype ``dt``, as CUDA stores
    it: for float16/bfloat16 rounded to the opmath type float32, then to ``dt``; returned as
    float64. Other dtypes: ``x`` unchanged (see the module docstring)."""
    if str(dt) not in HALF:
        return x
    return x.astype(np.float32).astype(dt).astype(np.float64)


def _scalar_inverse(s: float, dt: np.dtype) -> float:
    """The factor CUDA multiplies by for ``x / s`` with a Python scalar ``s``:
    ``opmath_t(1.0) / scalar_value<opmath_t>(s)``, float32 for float16/bfloat16."""
    if str(dt) not in HALF:
        return 1.0 / float(s)
    return float(np.float32(1.0) / np.float32(s))


def xattention_score_torch(q: np.ndarray, k: np.ndarray, block_size: int, stride: int,
                           chunk_size: int, norm: float, causal: bool) -> tuple[np.ndarray]:
    """Block scores ``W`` of ``xattn_estimate``'s torch branch (``select_mode="inverse"``,
    ``kdb=1``), on the chunk-padded grid.

    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]`` host arrays of one dtype (float64, float32,
    float16 or ml_dtypes bfloat16); GQA as ``repeat_kv`` (query head ``h`` reads kv head
    ``h // (Hq/Hkv)``). Returns ``(W,)``, float64 ``[B, Hq, nbp, nbp]`` holding values of the
    input dtype (the official ``attn_sums``), ``nbp = ceil(L/C)*C/block_size``.
    """
    dt = np.dtype(q.dtype)
    if np.dtype(k.dtype) != dt:
        raise InputError(f"xattention path='torch': q and k must have one dtype (torch.matmul), "
                         f"got {q.dtype} and {k.dtype}")
    if str(dt) not in DTYPES:
        raise InputError(f"xattention path='torch': dtype {dt} is not one of {DTYPES}")
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    S, bt = int(stride), int(block_size) // int(stride)
    Lp = num_blocks(L, chunk_size) * chunk_size
    T, RC = Lp // S, int(chunk_size) // S          # k_reshaped_seq_len, reshaped_chunk_size
    n_chunks, nbc, nbp = Lp // chunk_size, RC // bt, Lp // block_size
    pad_t = (Lp - L) // S                         # k_/q_reshaped_num_to_pad (q_len == k_len)
    invs = [_scalar_inverse(s, dt) for s in (math.sqrt(D), S, norm)]
    j = np.arange(T)
    # The base mask of L192-201: zeros, then columns [-pad_t:] = -inf. With pad_t == 0 the
    # slice [-0:] is the whole axis: every key tile is masked before L204 reopens the chunk.
    base_open = j < T - pad_t if pad_t > 0 else np.zeros(T, dtype=bool)
    W = np.zeros((B, Hq, nbp, nbp))
    rows = rows_per_chunk(nbc, bt * T * 8 * 4, 2 * Lp * D * 8 + W.nbytes,
                          "xattention_score_torch")
    for b in range(B):
        for h in range(Hq):
            qp = np.zeros((Lp, D))
            kp = np.zeros((Lp, D))
            qp[:L] = q[b, h].astype(np.float64)
            kp[:L] = k[b, h // (Hq // Hkv)].astype(np.float64)
            Kr = kp.reshape(T, S * D)                           # L85-87
            Qr = qp.reshape(T, S, D)[:, ::-1, :].reshape(T, S * D)  # L88-94
            for c in range(n_chunks):
                cs = c * RC                                     # chunk_start (offset 0)
                for I0 in range(0, nbc, rows):
                    I1 = min(nbc, I0 + rows)
                    r = np.arange(I0 * bt, I1 * bt)             # rows within the chunk
                    X = _store(Qr[cs + r] @ Kr.T, dt)           # L182-185
                    for inv in invs:                            # L187-189
                        X = _store(X * inv, dt)
                    if causal:                                  # L191-225
                        in_chunk = (j[None, :] >= cs) & (j[None, :] < cs + RC)
                        vis = np.where(in_chunk, j[None, :] - cs <= r[:, None],
                                       (j[None, :] < cs) & base_open[None, :])
                        if c == n_chunks - 1 and pad_t:         # L216-219
                            vis &= (r < RC - pad_t)[:, None]
                        X = np.where(vis, X, -np.inf)
                    with np.errstate(invalid="ignore"):         # L227-230; all -inf rows: NaN
                        P = np.exp(X - X.max(axis=1, keepdims=True))
                        P = _store(P / P.sum(axis=1, keepdims=True), dt)
                    if c == n_chunks - 1 and pad_t:             # L237-238
                        P[r >= RC - pad_t] = 0.0
                    # L240-252: view(nbc, bt, T/bt, bt).sum(-1).sum(-2), each sum stored
                    W1 = _store(P.reshape(I1 - I0, bt, T // bt, bt).sum(axis=-1), dt)
                    W[b, h, c * nbc + I0:c * nbc + I1] = _store(W1.sum(axis=1), dt)
    return (W,)
