"""Test support shared by pytest and ``refattn check``: input generators, awkward shapes,
the tolerance rule's emulated baseline, public assertion helpers, and the inputs on which
the registry-driven suite checks every kernel against its reference.

Other projects call :func:`assert_attention_matches` and :func:`assert_mask_matches` from
their own test suites.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .core.blockmask import BlockMask, legal_blocks, num_blocks
from .core.layout import causal_offset

# (Sq, Sk) pairs that hit edge cases (flash-attention's list, trimmed for a CPU suite).
AWKWARD_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1), (239, 1), (1, 239), (3, 799), (113, 203), (203, 113), (1023, 1024), (1024, 1023),
)
# Smaller set for kernels checked on every registry case.
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (17, 17), (64, 64), (113, 203), (203, 113), (130, 257))


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (bf16 via ml_dtypes), returned as that dtype."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)
    return np.asarray(x).astype(dtype)


# --------------------------------------------------------------------------- inputs
def random_qkv(rng: np.random.Generator, batch: int = 1, q_heads: int = 2, kv_heads: int = 1,
               q_len: int = 64, k_len: int = 64, head_dim: int = 32, v_dim: int | None = None,
               dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian q/k/v in ``bhsd``, rounded to ``dtype``."""
    v_dim = head_dim if v_dim is None else v_dim
    q = rng.standard_normal((batch, q_heads, q_len, head_dim))
    k = rng.standard_normal((batch, kv_heads, k_len, head_dim))
    v = rng.standard_normal((batch, kv_heads, k_len, v_dim))
    return tuple(round_to_dtype(x, dtype) for x in (q, k, v))  # type: ignore[return-value]


def structured_qkv(rng: np.random.Generator, batch: int = 1, q_heads: int = 2, kv_heads: int = 1,
                   q_len: int = 64, k_len: int = 64, head_dim: int = 32,
                   dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q/k/v with attention structure: a sink on key 0, a local diagonal, two vertical
    stripes, and one slash line, with per-head gains (see refattn.data.synthetic for the
    RoPE-based generator)."""
    q, k, v = (x.astype(np.float64) for x in random_qkv(rng, batch, q_heads, kv_heads, q_len,
                                                          k_len, head_dim))
    G = q_heads // kv_heads
    off = k_len - q_len
    sink = rng.standard_normal(head_dim)
    sink /= np.linalg.norm(sink)
    for h in range(q_heads):
        g = h // G
        gain = 1.0 + 2.0 * (h % 3)
        k[:, g, 0] += 3.0 * sink * np.sqrt(head_dim) / gain
        q[:, h] += gain * sink
        stripes = rng.choice(k_len, size=min(2, k_len), replace=False)
        k[:, g, stripes] += 1.5 * sink * np.sqrt(head_dim) / gain
    # local diagonal / slash: key j resembles query j - off (+ a slash at distance 7)
    for j in range(k_len):
        i = j - off
        if 0 <= i < q_len:
            k[:, :, j] += 0.5 * q[:, ::G, i]
        if 0 <= i + 7 < q_len:
            k[:, :, j] += 0.3 * q[:, ::G, i + 7]
    return tuple(round_to_dtype(x, dtype) for x in (q, k, v))  # type: ignore[return-value]


def sink_qkv(rng: np.random.Generator, **kw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adversarial: one key takes almost all attention (logits ~ 30 above the rest)."""
    q, k, v = (x.astype(np.float64) for x in random_qkv(rng, **kw))
    d = q.shape[-1]
    u = np.ones(d) / np.sqrt(d)
    q += 2.0 * u
    k[:, :, 0] += 15.0 * np.sqrt(d) * u / 2.0
    dt = kw.get("dtype", "float32")
    return tuple(round_to_dtype(x, dt) for x in (q, k, v))  # type: ignore[return-value]


def tied_qkv(rng: np.random.Generator, block_k: int, **kw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adversarial: whole key blocks copied, so block scores tie exactly."""
    q, k, v = random_qkv(rng, **kw)
    nb = num_blocks(k.shape[2], block_k)
    full = k.shape[2] // block_k
    if full >= 3:
        k[:, :, 2 * block_k:3 * block_k] = k[:, :, 0:block_k]
    del nb
    return q, k, v


def random_block_mask(rng: np.random.Generator, batch: int, heads: int, q_len: int, k_len: int,
                      block_q: int, block_k: int, density: float = 0.5, *, causal: bool = False,
                      empty_rows: bool = True, head_kind: str = "q") -> BlockMask:
    """Random mask of about ``density``, restricted to legal blocks when ``causal``; with
    ``empty_rows`` some rows are emptied and some made full."""
    qb, kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    m = rng.random((batch, heads, qb, kb)) < density
    if causal:
        m &= legal_blocks(q_len, k_len, block_q, block_k, True)
    if empty_rows and qb > 1:
        m[..., rng.integers(qb), :] = False
        m[..., rng.integers(qb), :] = True
    return BlockMask(m, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, head_kind=head_kind)


def structured_masks(batch: int, heads: int, q_len: int, k_len: int, block_q: int,
                     block_k: int) -> dict[str, BlockMask]:
    """Named masks: empty, full, single block, diagonal only, sink + diagonal."""
    qb, kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    base = np.zeros((batch, heads, qb, kb), bool)
    out = {"empty": base.copy(), "full": ~base}
    one = base.copy()
    one[..., qb // 2, kb // 2] = True
    out["single"] = one
    diag = base.copy()
    off = causal_offset(q_len, k_len)
    for I in range(qb):
        last = min((I + 1) * block_q, q_len) - 1 + off
        if last >= 0:
            diag[..., I, min(last, k_len - 1) // block_k] = True
    out["diagonal"] = diag
    sd = diag.copy()
    sd[..., 0] = True
    out["sink_diagonal"] = sd
    return {n: BlockMask(m, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len)
            for n, m in out.items()}


# -------------------------------------------------------------- tolerance baseline
def emulate_lowp_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any,
                           causal: bool, scale: float, dtype: str
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The emulated low-precision baseline of the tolerance rule: float32 arithmetic with
    the probabilities rounded to ``dtype`` before ``P V`` (as flash-attention's
    ``attention_ref(upcast=False, reorder_ops=True)``). Canonical ``bhsd`` arrays; inputs are
    rounded to ``dtype`` first. For ``float64`` it is float64 arithmetic."""
    from .core.blockmask import prepare_mask
    from .core.layout import AttnShape

    ct = np.float64 if dtype == "float64" else np.float32
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    mask = prepare_mask(mask, shape)
    G = shape.group
    rq, rk, rv = (round_to_dtype(x.astype(np.float32) if dtype != "float64" else x, dtype).astype(ct)
                  for x in (q, k, v))
    o = np.zeros((shape.batch, shape.q_heads, shape.q_len, shape.v_dim), np.float64)
    lse = np.full((shape.batch, shape.q_heads, shape.q_len), -np.inf, np.float64)
    R = max(1, min(shape.q_len, (1 << 24) // max(1, G * shape.k_len)))
    off = causal_offset(shape.q_len, shape.k_len)
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            h0, h1 = g * G, (g + 1) * G
            for r0 in range(0, shape.q_len, R):
                r1 = min(r0 + R, shape.q_len)
                s = (rq[b, h0:h1, r0:r1] @ rk[b, g].T) * ct(scale)
                vis = None if mask is None else mask.token_rows(b, h0, h1, r0, r1)
                if causal:
                    c = np.arange(shape.k_len)[None, :] <= np.arange(r0, r1)[:, None] + off
                    vis = c[None] if vis is None else vis & c[None]
                if vis is not None:
                    s = np.where(vis, s, -np.inf)
                m = s.max(-1, keepdims=True)
                empty = ~np.isfinite(m)
                m = np.where(empty, 0, m).astype(ct)
                p = np.exp(s - m)
                l = p.sum(-1, keepdims=True, dtype=ct)
                pr = round_to_dtype(p, dtype).astype(ct) if dtype != "float64" else p
                with np.errstate(divide="ignore", invalid="ignore"):
                    o[b, h0:h1, r0:r1] = np.where(empty, 0, (pr @ rv[b, g]) / np.where(empty, 1, l))
                    lse[b, h0:h1, r0:r1] = np.where(empty, -np.inf, m + np.log(l))[..., 0]
    return o, lse


# ------------------------------------------------------------- public assertions
def assert_attention_matches(out: Any, q: Any, k: Any, v: Any, *, mask: Any = None,
                             causal: bool = False, softmax_scale: float | None = None,
                             lse: Any = None, lse_base: str = "e", layout: str = "bhsd",
                             dtype: str | None = None) -> None:
    """Assert that ``out`` (and ``lse``) is attention of q/k/v under the tolerance rule;
    the AssertionError message is the readable report of what differs and where."""
    from .check import compare_attention

    rep = compare_attention(q, k, v, out, mask=mask, causal=causal, softmax_scale=softmax_scale,
                            dtype=dtype, candidate_lse=lse, lse_base=lse_base, layout=layout)
    if not rep.ok:
        raise AssertionError(rep.summary())


def assert_mask_matches(ref: Any, candidate: Any, tol: float = 1e-6) -> None:
    """Assert that ``candidate`` equals the reference selection up to near-ties."""
    from .check import compare_masks

    rep = compare_masks(ref, candidate, tol)
    if not rep.ok:
        raise AssertionError(rep.summary())


# ------------------------------------------------------- registry-driven test cases
def op_cases(name: str, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Inputs for checking every kernel of op ``name``: dicts with ``args`` (positional
    arguments of the reference), ``dtype`` (the input precision) and ``label``.

    Raises KeyError for an op without cases (the suite then fails, so a new kernel's op
    must bring its cases)."""
    _load_case_modules()
    gen = _CASES[name]
    yield from gen(rng)


def _attention_inputs(rng: np.random.Generator) -> Iterator[tuple[str, tuple, Any, bool, str]]:
    configs = [
        # (label, B, Hq, Hkv, Sq, Sk, D, bq, bk, dtype)
        ("mha", 1, 2, 2, 64, 64, 32, 16, 16, "float32"),
        ("gqa_partial", 2, 4, 2, 113, 203, 64, 32, 64, "float32"),
        ("sq_gt_sk", 1, 2, 1, 203, 113, 32, 64, 32, "float32"),
        ("one_block", 1, 2, 1, 17, 17, 16, 64, 64, "float32"),
        ("per_token", 1, 2, 1, 40, 130, 32, 1, 32, "float32"),
        ("bf16", 1, 4, 1, 130, 257, 64, 64, 64, "bfloat16"),
        ("fp16", 1, 2, 2, 96, 96, 128, 64, 64, "float16"),
    ]
    for label, B, Hq, Hkv, Sq, Sk, D, bq, bk, dt in configs:
        maker = structured_qkv if "partial" in label or "bf16" in label else random_qkv
        q, k, v = maker(rng, B, Hq, Hkv, Sq, Sk, D, dtype=dt)
        for causal in (False, True):
            yield f"{label}-dense-c{int(causal)}", (q, k, v), None, causal, dt
            m = random_block_mask(rng, B, Hq if label != "mha" else 1, Sq, Sk, bq, bk, 0.4,
                                  causal=causal)
            yield f"{label}-random-c{int(causal)}", (q, k, v), m, causal, dt
        for mname, m in structured_masks(B, Hq, Sq, Sk, bq, bk).items():
            yield f"{label}-{mname}-c1", (q, k, v), m, True, dt


def _cases_attention_fwd(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, (q, k, v), m, causal, dt in _attention_inputs(rng):
        scale = 1.0 / np.sqrt(q.shape[-1])
        yield {"label": label, "args": (q, k, v, m, causal, scale), "dtype": dt}


def _cases_attention_bwd(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    from .reference.attention import attention_forward

    for label, (q, k, v), m, causal, dt in _attention_inputs(rng):
        if dt != "float32":
            continue
        scale = 1.0 / np.sqrt(q.shape[-1])
        o, lse = attention_forward(q, k, v, m, causal, scale)
        do = rng.standard_normal(o.shape).astype(np.float32)
        yield {"label": label, "args": (q, k, v, o.astype(np.float32), do, lse.astype(np.float32),
                                        m, causal, scale), "dtype": dt}


def emulate_lowp_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray,
                          do: np.ndarray, lse: np.ndarray, mask: Any, causal: bool,
                          scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 baseline of the backward (same algorithm as the reference, float32
    arithmetic), for the tolerance rule on dq, dk, dv."""
    from .core.blockmask import prepare_mask
    from .core.layout import AttnShape

    f = np.float32
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    mask = prepare_mask(mask, shape)
    G = shape.group
    dq = np.zeros(q.shape, f)
    dk = np.zeros(k.shape, f)
    dv = np.zeros(v.shape, f)
    off = causal_offset(shape.q_len, shape.k_len)
    for b in range(shape.batch):
        for h in range(shape.q_heads):
            g = h // G
            qq, kk, vv = q[b, h].astype(f), k[b, g].astype(f), v[b, g].astype(f)
            s = (qq @ kk.T) * f(scale)
            vis = np.ones(s.shape, bool) if mask is None else mask.token_rows(b, h, h + 1, 0, shape.q_len)[0]
            if causal:
                vis = vis & (np.arange(shape.k_len)[None, :] <= np.arange(shape.q_len)[:, None] + off)
            l = lse[b, h].astype(f)[:, None]
            vis = vis & np.isfinite(l)
            p = np.where(vis, np.exp(np.where(vis, s - np.where(np.isfinite(l), l, 0), 0)), 0).astype(f)
            dob = do[b, h].astype(f)
            dv[b, g] += p.T @ dob
            dp = dob @ vv.T
            ds = p * (dp - (dob * o[b, h].astype(f)).sum(-1, keepdims=True))
            dq[b, h] = f(scale) * (ds @ kk)
            dk[b, g] += f(scale) * (ds.T @ qq)
    return dq, dk, dv


def op_baseline(name: str, args: tuple, dtype: str) -> tuple[np.ndarray, ...] | None:
    """The emulated low-precision outputs of op ``name`` for the tolerance rule (None when
    the op has no baseline: the rule then falls back to an eps-based bound)."""
    if name == "attention_fwd":
        q, k, v, m, causal, scale = args
        return emulate_lowp_attention(q, k, v, m, causal, scale, dtype)
    if name == "attention_bwd":
        return emulate_lowp_backward(*args)
    return None


def op_error_floor(name: str, args: tuple, dtype: str, ref: np.ndarray) -> float:
    """A floor under the baseline error of the tolerance rule for float32 kernels of the
    attention ops: ``sqrt(K) * eps32 * max|ref|``, the expected rounding error of a float32
    sum of ``K`` terms in any order (``K`` = keys for the forward and dq, query rows of a
    GQA group for dk/dv). The NumPy float32 baseline sums with BLAS/pairwise precision,
    which a kernel summing in another legitimate order (atomics, tiles) need not match.
    0 for other ops and dtypes (bf16/fp16 baselines are dominated by rounding P).

    The forward's LSE (``[B, H, Sq]``, always float32, whatever the input dtype) gets
    ``4 * eps32 * max|lse|``: kernels form it in the base-2 domain (``m * scale * log2(e) +
    log2(l)``, then times ``ln 2``), a few float32 roundings of a value of size ``|lse|``,
    which the emulated baseline (natural-log arithmetic) need not share."""
    if name == "attention_fwd" and np.ndim(ref) == 3:
        r = np.asarray(ref, np.float64)
        fin = np.isfinite(r)
        return float(4 * np.finfo(np.float32).eps * (np.abs(r[fin]).max() if fin.any() else 0.0))
    if dtype != "float32" or name not in ("attention_fwd", "attention_bwd"):
        return 0.0
    q, k = args[0], args[1]
    K = max(k.shape[2], q.shape[2] * (q.shape[1] // k.shape[1]))
    r = np.asarray(ref, np.float64)
    fin = np.isfinite(r)
    return float(np.sqrt(K) * np.finfo(np.float32).eps * (np.abs(r[fin]).max() if fin.any() else 0.0))


_CASES = {"attention_fwd": _cases_attention_fwd, "attention_bwd": _cases_attention_bwd}


def register_cases(name: str, gen: Any) -> None:
    """Add the case generator of op ``name`` (used by method/kernel modules' tests)."""
    _CASES[name] = gen


def has_cases(name: str) -> bool:
    _load_case_modules()
    return name in _CASES


def _load_case_modules() -> None:
    """Import every module of :mod:`refattn.cases` (each registers its ops' cases)."""
    import importlib
    import pkgutil

    from . import cases

    for mod in pkgutil.iter_modules(cases.__path__):
        importlib.import_module(f"{cases.__name__}.{mod.name}")
