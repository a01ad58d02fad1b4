"""CuPy launchers for the generic selection primitives (backend ``"cupy"`` of the registry).

Registered ops (the 2-D canonical ops of ``refattn.reference.selection``, same arguments,
same outputs, bit for bit; kind ``"exact"``):

* ``selection_topk_rows(scores [R, N], k, valid=None, tie="low", *, out=None)``;
* ``selection_topk_global(scores [H, Qb, Kb], k, valid=None, tie="low", *, out=None)``: one
  budget per head over its ``Qb * Kb`` blocks, ties by flat index ``row * Kb + col``;
* ``selection_cumulative_threshold(scores [R, N], tau, valid=None, normalize=True,
  tie="low", include_crossing=True, *, out=None)``;
* ``selection_fixed_threshold(scores [R, N], threshold, valid=None, inclusive=True, *,
  out=None)``.

Each returns ``(mask bool like scores, boundary float64 [R] or [H])``: the reference's
selection (rank by score descending, ties to the lower index or, with ``tie="high"``, the
higher one; NaN and invalid entries never selected; ``k`` / ``tau`` / ``threshold`` scalar
or per row) and its boundary (the smallest selected score, ``nan`` where nothing was
selected; the threshold itself for the fixed rule).

Inputs: scores float16, bfloat16, float32 or float64 (integers are converted to float64,
as the reference does), NumPy or CuPy (or anything :func:`refattn.core.layout.as_array`
turns into CuPy). ``valid``: bool, broadcastable to the scores. ``k``, ``tau``,
``threshold``: scalars or ``[R]`` (``[H]``) arrays, NumPy or CuPy. NumPy scores give NumPy
results, device scores CuPy results. ``out=``: a tuple ``(mask, boundary)`` of NumPy or
CuPy arrays, bool and float (float32 or float64); both are written completely and ``out``
is returned.

Kernels (``gpu/select_topk.cu``, ``gpu/select_threshold.cu``; docs/gpu.md, "Selection
kernels"):

* top-k: radix select of the k-th largest order-preserving key, then an ordered tie pass;
  one warp per row up to :data:`WARP_MAX` entries, one CTA per row while the row's keys fit
  :data:`BLOCK_KEY_BYTES` of shared memory, else many CTAs per row (chunks of
  :data:`G_CHUNK` entries, histograms summed in global memory);
* cumulative: per row a bitonic sort of the masses in shared memory and the reference's own
  float64 arithmetic (sequential sum, divide, compare) on one thread gives the kept count
  ``m`` (rows longer than :data:`CUM_BLOCK_MAX`: keys sorted by CuPy, then one thread per
  row); the mask and boundary are the row's top ``m``;
* fixed threshold: one elementwise float64 comparison.

Reading back the cumulative rule's "negative mass" flag synchronises the stream (the
reference raises :class:`InputError` on negative masses); the other ops do not synchronise
for CuPy inputs, except to validate CuPy ``k`` arrays.
"""
from __future__ import annotations

import re
import threading
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.errors import InputError
from refattn.core.layout import as_array
from refattn.core.registry import register

from . import _build
from ._build import launch

_FMT = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
_BITS = {0: np.uint16, 1: np.uint16, 2: np.uint32, 3: np.uint64}
_KEY_T = {0: "unsigned", 1: "unsigned", 2: "unsigned", 3: "unsigned long long"}
_NULL = np.uint64(0)
_I32, _I64 = np.int32, np.int64

#: Rows up to this many entries run one warp per row (4 rows per CTA).
WARP_MAX = 1024
#: Threads of the one-CTA-per-row kernels.
BLOCK_THREADS = 512
#: Rows whose keys (4 bytes per entry, 8 for float64) fit this many bytes of shared memory
#: run one CTA per row; longer rows run the multi-CTA kernels.
BLOCK_KEY_BYTES = 64 * 1024
#: Cumulative rule: rows up to this many entries (rounded up to a power of two) are sorted
#: in shared memory; longer rows are sorted by CuPy.
CUM_BLOCK_MAX = 8192
#: Entries per CTA of the multi-CTA (long-row) kernels; must equal G_CHUNK of select_keys.cuh.
G_CHUNK = 4096
_G_THREADS = 256
_TOPK_PATHS = ("auto", "warp", "block", "multi")
_CUM_PATHS = ("auto", "warp", "block", "sort")
_OPTIN: dict[int, int] = {}
_LOCK = threading.Lock()
_MODULES: dict[tuple[str, str, int], Any] = {}
_FUNCS: dict[tuple[str, int], Any] = {}


def _family(filename: str, fmt: str) -> list[str]:
    """Every kernel instantiation of one score format in ``filename`` (compiled together: one
    NVRTC run instead of one per kernel); ``"any"``: the format-free kernels."""
    if filename == "select_topk.cu":
        if fmt == "any":
            return ["sel_g_pick"]
        return [f"sel_topk_group<{fmt}, 32>", f"sel_topk_group<{fmt}, {BLOCK_THREADS}>",
                f"sel_g_hist<{fmt}>", f"sel_g_ties<{fmt}>", f"sel_g_mask<{fmt}>"]
    if fmt == "any":
        return ["sel_cum_serial<unsigned>", "sel_cum_serial<unsigned long long>"]
    return [f"sel_cum_group<{fmt}, 32>", f"sel_cum_group<{fmt}, {BLOCK_THREADS}>",
            f"sel_cum_keys<{fmt}>", f"sel_fixed<{fmt}>"]


def get_kernel(filename: str, name: str) -> Any:
    """The :class:`cupy.RawKernel` ``name`` of ``select_topk.cu`` or ``select_threshold.cu``
    (as ``_build.get_kernel``, but each file's kernels of one score format are compiled in one
    module, lazily, on first use)."""
    assert filename in ("select_topk.cu", "select_threshold.cu")
    dev = cp.cuda.Device().id
    fn = _FUNCS.get((name, dev))
    if fn is not None:
        return fn
    m = re.match(r"\w+<(\d+)", name)
    fam = m.group(1) if m else "any"
    key = (filename, fam, dev)
    mod = _MODULES.get(key)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                try:
                    opts = _build.compile_options(filename)
                except TypeError:          # the older signature, without a file name
                    opts = _build.compile_options()
                mod = cp.RawModule(code=_build._source(filename), options=opts,
                                   name_expressions=_family(filename, fam))
                _MODULES[key] = mod
    fn = _FUNCS[(name, dev)] = mod.get_function(name)
    return fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _a16(n: int) -> int:
    return (n + 15) & ~15


def _smem_optin() -> int:
    """Largest dynamic shared memory one CTA may opt in to on the current device."""
    dev = cp.cuda.Device()
    v = _OPTIN.get(dev.id)
    if v is None:
        try:
            v = int(dev.attributes.get("MaxSharedMemoryPerBlockOptin", 48 * 1024))
        except Exception:  # pragma: no cover - depends on the CuPy version
            v = 48 * 1024
        _OPTIN[dev.id] = v
    return v


# ----------------------------------------------------------------------------- inputs
def _scores(scores: Any, ndim: int, name: str) -> tuple[Any, int, bool, tuple[int, ...]]:
    """``(raw bits on the device, FMT, came from host, shape)``: fp16/bf16/fp32/fp64 travel
    as their bits (uint16/uint16/uint32/uint64); other real dtypes become float64."""
    x = as_array(scores, "scores")
    host = isinstance(x, np.ndarray)
    kind = str(x.dtype)
    if x.dtype.kind not in "fiu" and kind != "bfloat16":
        raise InputError(f"{name}: scores must be a real array, got dtype {x.dtype}")
    if x.ndim != ndim:
        axes = "[R, N]" if ndim == 2 else "[H, Qb, Kb]"
        raise InputError(f"{name}: scores must be {ndim}-d {axes}, got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise InputError(f"{name}: scores has no candidates (last axis of length 0), shape "
                         f"{tuple(x.shape)}")
    if kind in _FMT:
        fmt = _FMT[kind]
    else:
        fmt = 3
        x = np.asarray(x, dtype=np.float64) if host else x.astype(cp.float64)
    bits = _BITS[fmt]
    if host:
        d = cp.asarray(np.ascontiguousarray(x).view(bits))
    else:
        d = cp.ascontiguousarray(x.view(bits))
    shape = tuple(int(n) for n in x.shape)
    rows = int(np.prod(shape[:-1])) if ndim == 2 else shape[0]
    n = shape[-1] if ndim == 2 else shape[1] * shape[2]
    if n >= 2**31 - G_CHUNK or _cdiv(n, G_CHUNK) * max(rows, 1) >= 2**31:
        raise InputError(f"{name}: scores of shape {shape} are too large for the cupy kernels")
    return d, fmt, host, shape


def _valid(valid: Any, shape: tuple[int, ...], name: str) -> tuple[Any, tuple[int, ...]]:
    """``(device bool array or NULL, element strides of its broadcast to shape)``."""
    if valid is None:
        return _NULL, (0,) * len(shape)
    v = as_array(valid, "valid")
    if v.dtype != np.bool_:
        raise InputError(f"{name}: valid must be a bool array, got dtype {v.dtype}")
    try:
        ok = tuple(np.broadcast_shapes(tuple(v.shape), shape)) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"{name}: valid of shape {tuple(v.shape)} does not broadcast to scores "
                         f"{tuple(shape)}")
    d = cp.asarray(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else cp.ascontiguousarray(v)
    b = cp.broadcast_to(d, shape)
    return d, tuple(int(s) for s in b.strides)      # bool: bytes == elements


def _valid_rows(valid: Any, shape: tuple[int, int], name: str) -> tuple[Any, int, int]:
    d, (sr, sc) = _valid(valid, shape, name)
    return d, sr, sc


def _valid_heads(valid: Any, shape: tuple[int, int, int], name: str) -> tuple[Any, int, int]:
    """valid of ``[H, Qb, Kb]`` scores as (array, head stride, flat-index stride): the flat
    index ``q * Kb + c`` of a head addresses it when its last two axes are laid out as one
    (e.g. a causal ``[Qb, Kb]`` pattern, or a full ``[H, Qb, Kb]``); otherwise it is
    materialised."""
    H, Qb, Kb = shape
    d, (sh, sq, sc) = _valid(valid, shape, name)
    if d is _NULL:
        return d, 0, 0
    if Qb == 1 or sq == Kb * sc:
        return d, sh, sc
    return cp.ascontiguousarray(cp.broadcast_to(d, shape)), Qb * Kb, 1


def _per_row(x: Any, n: int, name: str, what: str, dtype: Any) -> Any:
    """``x`` broadcast to ``[n]`` on the device (errors as the reference's ``_per_row``)."""
    a = as_array(x, what)
    if isinstance(a, np.ndarray):
        a = np.asarray(a, dtype=dtype) if dtype is not None else a
        try:
            a = np.broadcast_to(a, (n,))
        except ValueError:
            raise InputError(f"{name}: {what} must be a scalar or have shape ({n},), got shape "
                             f"{a.shape}") from None
        return a
    b = a.astype(dtype) if dtype is not None else a
    try:
        return cp.broadcast_to(b, (n,))
    except ValueError:
        raise InputError(f"{name}: {what} must be a scalar or have shape ({n},), got shape "
                         f"{tuple(a.shape)}") from None


def _floats(x: Any, n: int, name: str, what: str) -> Any:
    a = _per_row(x, n, name, what, np.float64)
    if isinstance(a, np.ndarray):
        return cp.asarray(np.ascontiguousarray(a))
    return cp.ascontiguousarray(a)


def _budgets(k: Any, n: int, name: str) -> Any:
    """Per-row budgets as device int64 ``[n]`` (integers >= 0, as the reference demands)."""
    kk = _per_row(k, n, name, "k", None)
    xp = np if isinstance(kk, np.ndarray) else cp
    if kk.dtype.kind not in "iu":
        if kk.dtype.kind != "f" or (kk.size and not bool(xp.all(xp.equal(xp.mod(kk, 1), 0)))):
            raise InputError(f"topk: k must be an integer, got {k!r}")
    if kk.size and bool((kk < 0).any()):
        raise InputError(f"topk: k must be >= 0, got {k!r}")
    if xp is np:
        return cp.asarray(np.ascontiguousarray(kk, dtype=np.int64))
    return cp.ascontiguousarray(kk.astype(cp.int64))


def _tie_high(tie: Any) -> bool:
    if not isinstance(tie, str) or tie not in ("low", "high"):
        raise InputError(f"tie: expected 'low' or 'high', got {tie!r}")
    return tie == "high"


# ----------------------------------------------------------------------------- outputs
def _outputs(out: Any, mshape: tuple[int, ...], nb: int, name: str) -> tuple[Any, Any, Any]:
    """``(caller's out or None, device mask, device boundary)``: the caller's CuPy arrays
    when the kernels can write them in place (C-contiguous, float64 boundary), else new."""
    if out is None:
        return None, cp.empty(mshape, cp.bool_), cp.empty((nb,), cp.float64)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise InputError(f"{name}: out= must hold 2 arrays (mask, boundary)")
    m, b = out
    if (not isinstance(m, (np.ndarray, cp.ndarray)) or m.dtype != np.bool_
            or tuple(m.shape) != tuple(mshape)):
        raise InputError(f"{name}: out[0] must be a bool array of shape {tuple(mshape)}, "
                         f"got {getattr(m, 'dtype', type(m))} {getattr(m, 'shape', '')}")
    if (not isinstance(b, (np.ndarray, cp.ndarray)) or b.dtype.kind != "f"
            or tuple(b.shape) != (nb,)):
        raise InputError(f"{name}: out[1] must be a float array of shape ({nb},), "
                         f"got {getattr(b, 'dtype', type(b))} {getattr(b, 'shape', '')}")
    md = m if isinstance(m, cp.ndarray) and m.flags.c_contiguous else cp.empty(mshape, cp.bool_)
    bd = (b if isinstance(b, cp.ndarray) and b.dtype == np.float64 and b.flags.c_contiguous
          else cp.empty((nb,), cp.float64))
    return (m, b), md, bd


def _finish(outs: Any, md: Any, bd: Any, host: bool) -> tuple[Any, Any]:
    if outs is None:
        return (md.get(), bd.get()) if host else (md, bd)
    for o, d in zip(outs, (md, bd), strict=True):
        if o is d:
            continue
        if isinstance(o, np.ndarray):
            o[...] = d.get()
        else:
            o[...] = d
    return tuple(outs)


# ----------------------------------------------------------------------------- top-m
def _key_bytes(fmt: int) -> int:
    return 8 if fmt == 3 else 4


def topk_path(N: int, fmt: int) -> str:
    """The top-k kernel family that runs rows of ``N`` entries (``"warp"``: one warp per
    row; ``"block"``: one CTA per row; ``"multi"``: many CTAs per row)."""
    if N <= WARP_MAX:
        return "warp"
    keys = _a16(N * _key_bytes(fmt))
    if keys <= BLOCK_KEY_BYTES and keys + 1280 <= _smem_optin():
        return "block"
    return "multi"


def _top_m(d: Any, fmt: int, R: int, N: int, vd: Any, vsr: int, vsc: int, kk: Any,
           tie_high: bool, md: Any, bd: Any, path: str = "auto") -> None:
    """Write the top-``kk[r]`` mask of every row into ``md`` ``[R, N]`` and the boundary into
    ``bd`` ``[R]`` (``kk``: device int64 ``[R]``, each >= 0)."""
    if path not in _TOPK_PATHS:
        raise ValueError(f"path: expected one of {_TOPK_PATHS}, got {path!r}")
    if R == 0:
        return
    if path == "auto":
        path = topk_path(N, fmt)
    common = (d, vd, _I64(vsr), _I64(vsc))
    th = _I32(bool(tie_high))
    if path in ("warp", "block"):
        per = _a16(N * _key_bytes(fmt)) + 1280        # keys + histogram + scratch, per row
        if path == "warp":
            groups = max(1, min(4, (48 * 1024) // per))
            fn = get_kernel("select_topk.cu", f"sel_topk_group<{fmt}, 32>")
            grid, block, smem = (_cdiv(R, groups),), (32 * groups,), groups * per
        else:
            fn = get_kernel("select_topk.cu", f"sel_topk_group<{fmt}, {BLOCK_THREADS}>")
            grid, block, smem = (R,), (BLOCK_THREADS,), per
        if smem > _smem_optin():
            raise InputError(f"top-k: rows of {N} entries need {smem} bytes of shared memory "
                             f"on the {path} path (device limit {_smem_optin()})")
        launch(fn, grid, block, common + (kk, _I32(R), _I32(N), th, md, bd), shared_mem=smem)
        return
    nch = _cdiv(N, G_CHUNK)
    kbits = 8 * _key_bytes(fmt)
    st = cp.empty((R, 4), cp.uint64)
    ghist = cp.zeros((R, 256), cp.uint32)
    nvalid = cp.zeros((R,), cp.uint32)
    tcnt = cp.empty((R, nch), cp.uint32)
    grid, block = (R * nch,), (_G_THREADS,)
    f_hist = get_kernel("select_topk.cu", f"sel_g_hist<{fmt}>")
    f_pick = get_kernel("select_topk.cu", "sel_g_pick")
    geo = common + (_I32(N), _I32(nch))
    launch(f_hist, grid, block, geo + (_NULL, ghist, nvalid, _I32(kbits - 8)))
    launch(f_pick, (R,), (32,), (kk, nvalid, st, ghist, _I32(kbits - 8), _I32(1)))
    for shift in range(kbits - 16, -1, -8):
        launch(f_hist, grid, block, geo + (st, ghist, _NULL, _I32(shift)))
        launch(f_pick, (R,), (32,), (kk, nvalid, st, ghist, _I32(shift), _I32(0)))
    launch(get_kernel("select_topk.cu", f"sel_g_ties<{fmt}>"), grid, block, geo + (st, tcnt))
    launch(get_kernel("select_topk.cu", f"sel_g_mask<{fmt}>"), grid, block,
           geo + (st, tcnt, th, md, bd))


# ----------------------------------------------------------------------------- cumulative
def cumulative_path(N: int, fmt: int) -> str:
    """The kernel family that counts the cumulative rule's kept entries for rows of ``N``
    (``"warp"``, ``"block"``: sort in shared memory; ``"sort"``: CuPy sort)."""
    P2 = 1 << max(0, (N - 1).bit_length())
    if P2 <= WARP_MAX:
        return "warp"
    if P2 <= CUM_BLOCK_MAX and _cum_group_bytes(P2, fmt) <= _smem_optin():
        return "block"
    return "sort"


def _cum_group_bytes(P2: int, fmt: int) -> int:
    return _a16(_a16(P2 * _key_bytes(fmt)) + 8 * P2 + 256)


def _cum_counts(d: Any, fmt: int, R: int, N: int, vd: Any, vsr: int, vsc: int, tau: Any,
                normalize: bool, incl: bool, path: str = "auto") -> Any:
    """Device int64 ``[R]``: the number of ranked entries the cumulative rule keeps per row
    (raises InputError on a negative candidate mass)."""
    if path not in _CUM_PATHS:
        raise ValueError(f"path: expected one of {_CUM_PATHS}, got {path!r}")
    m = cp.zeros((R,), cp.int64)
    if R == 0:
        return m
    flags = cp.zeros((1,), cp.int32)
    if path == "auto":
        path = cumulative_path(N, fmt)
    common = (d, vd, _I64(vsr), _I64(vsc))
    flags_args = (_I32(bool(normalize)), _I32(bool(incl)), m, flags)
    if path in ("warp", "block"):
        P2 = 1 << max(0, (N - 1).bit_length())
        per = _cum_group_bytes(P2, fmt)
        if path == "warp":
            groups = max(1, min(4, (48 * 1024) // per))
            fn = get_kernel("select_threshold.cu", f"sel_cum_group<{fmt}, 32>")
            grid, block, smem = (_cdiv(R, groups),), (32 * groups,), groups * per
        else:
            fn = get_kernel("select_threshold.cu", f"sel_cum_group<{fmt}, {BLOCK_THREADS}>")
            grid, block, smem = (R,), (BLOCK_THREADS,), per
        if smem > _smem_optin():
            raise InputError(f"cumulative_threshold: rows of {N} entries need {smem} bytes of "
                             f"shared memory on the {path} path (device limit {_smem_optin()})")
        launch(fn, grid, block, common + (tau, _I32(R), _I32(N), _I32(P2)) + flags_args,
               shared_mem=smem)
    else:
        kdt = cp.uint64 if fmt == 3 else cp.uint32
        keys = cp.empty((R, N), kdt)
        launch(get_kernel("select_threshold.cu", f"sel_cum_keys<{fmt}>"),
               (min(_cdiv(R * N, 256), 1 << 16),), (256,),
               common + (_I64(R), _I32(N), keys, flags))
        nv = cp.count_nonzero(keys, axis=1).astype(cp.int64)
        srt = cp.sort(keys, axis=1)
        del keys
        launch(get_kernel("select_threshold.cu", f"sel_cum_serial<{_KEY_T[fmt]}>"),
               (_cdiv(R, 128),), (128,), (srt, nv, tau, _I32(R), _I32(N), _I32(bool(normalize)),
                        _I32(bool(incl)), m))
    if int(flags.get()[0]):
        raise InputError("cumulative_threshold: scores must be non-negative masses")
    return m


# ----------------------------------------------------------------------------- ops
def topk_rows_impl(scores: Any, k: Any, valid: Any = None, tie: str = "low", *,
                   out: Any = None, path: str = "auto") -> tuple[Any, Any]:
    """:func:`topk_rows` with the kernel family chosen by ``path`` (``"auto"``, ``"warp"``,
    ``"block"``, ``"multi"``; the tests run every family on the same rows)."""
    d, fmt, host, (R, N) = _scores(scores, 2, "topk_rows")
    kk = _budgets(k, R, "topk_rows")
    vd, vsr, vsc = _valid_rows(valid, (R, N), "topk_rows")
    th = _tie_high(tie)
    outs, md, bd = _outputs(out, (R, N), R, "topk_rows")
    _top_m(d, fmt, R, N, vd, vsr, vsc, kk, th, md, bd, path)
    return _finish(outs, md, bd, host)


def topk_global_impl(scores: Any, k: Any, valid: Any = None, tie: str = "low", *,
                     out: Any = None, path: str = "auto") -> tuple[Any, Any]:
    """:func:`topk_global` with the kernel family chosen by ``path``."""
    d, fmt, host, (H, Qb, Kb) = _scores(scores, 3, "topk_heads")
    kk = _budgets(k, H, "topk_heads")
    vd, vsr, vsc = _valid_heads(valid, (H, Qb, Kb), "topk_heads")
    th = _tie_high(tie)
    outs, md, bd = _outputs(out, (H, Qb, Kb), H, "topk_heads")
    _top_m(d, fmt, H, Qb * Kb, vd, vsr, vsc, kk, th, md, bd, path)
    return _finish(outs, md, bd, host)


def cumulative_impl(scores: Any, tau: Any, valid: Any = None, normalize: bool = True,
                    tie: str = "low", include_crossing: bool = True, *, out: Any = None,
                    count_path: str = "auto", path: str = "auto") -> tuple[Any, Any]:
    """:func:`cumulative_threshold` with the counting kernels chosen by ``count_path``
    (``"auto"``, ``"warp"``, ``"block"``, ``"sort"``) and the top-m kernels by ``path``."""
    d, fmt, host, (R, N) = _scores(scores, 2, "cumulative_rows")
    t = _floats(tau, R, "cumulative_rows", "tau")
    vd, vsr, vsc = _valid_rows(valid, (R, N), "cumulative_rows")
    m = _cum_counts(d, fmt, R, N, vd, vsr, vsc, t, normalize, include_crossing, count_path)
    th = _tie_high(tie)
    outs, md, bd = _outputs(out, (R, N), R, "cumulative_rows")
    _top_m(d, fmt, R, N, vd, vsr, vsc, m, th, md, bd, path)
    return _finish(outs, md, bd, host)


@register("selection_topk_rows", "cupy")
def topk_rows(scores: Any, k: Any, valid: Any = None, tie: str = "low", *,
              out: Any = None) -> tuple[Any, Any]:
    """Top-``k`` per row. ``scores [R, N]``, ``k`` int scalar or ``[R]`` (0 keeps nothing,
    ``k > N`` every candidate), ``valid`` bool broadcastable to ``[R, N]`` or None, ``tie``
    ``"low"``/``"high"``. Returns ``(mask bool [R, N], boundary float64 [R])``."""
    return topk_rows_impl(scores, k, valid, tie, out=out)


@register("selection_topk_global", "cupy")
def topk_global(scores: Any, k: Any, valid: Any = None, tie: str = "low", *,
                out: Any = None) -> tuple[Any, Any]:
    """Top-``k`` per head over all ``Qb * Kb`` blocks, ties by flat index. ``scores
    [H, Qb, Kb]``, ``k`` int scalar or ``[H]``, ``valid`` bool broadcastable to
    ``[H, Qb, Kb]`` or None. Returns ``(mask bool [H, Qb, Kb], boundary float64 [H])``."""
    return topk_global_impl(scores, k, valid, tie, out=out)


@register("selection_cumulative_threshold", "cupy")
def cumulative_threshold(scores: Any, tau: Any, valid: Any = None, normalize: bool = True,
                         tie: str = "low", include_crossing: bool = True, *,
                         out: Any = None) -> tuple[Any, Any]:
    """Cumulative-mass threshold per row. ``scores [R, N]`` non-negative masses, ``tau``
    scalar or ``[R]``. Returns ``(mask bool [R, N], boundary float64 [R])``; raises
    InputError on a negative candidate mass."""
    return cumulative_impl(scores, tau, valid, normalize, tie, include_crossing, out=out)


@register("selection_fixed_threshold", "cupy")
def fixed_threshold(scores: Any, threshold: Any, valid: Any = None, inclusive: bool = True, *,
                    out: Any = None) -> tuple[Any, Any]:
    """``mask = valid & (float64(scores) >= threshold[r])`` (``>`` unless ``inclusive``).
    ``scores [R, N]``, ``threshold`` scalar or ``[R]``. Returns ``(mask bool [R, N],
    boundary float64 [R])`` (the threshold of each row)."""
    d, fmt, host, (R, N) = _scores(scores, 2, "fixed_rows")
    t = _floats(threshold, R, "fixed_rows", "threshold")
    vd, vsr, vsc = _valid_rows(valid, (R, N), "fixed_rows")
    outs, md, bd = _outputs(out, (R, N), R, "fixed_rows")
    if R:
        if N <= 2048:
            cw, cpr, rpb = N, 1, max(1, 2048 // N)
        else:
            cw, cpr, rpb = 2048, _cdiv(N, 2048), 1
        launch(get_kernel("select_threshold.cu", f"sel_fixed<{fmt}>"), (_cdiv(R, rpb) * cpr,), (256,),
               (d, vd, _I64(vsr), _I64(vsc), t, _I32(R), _I32(N), _I32(rpb), _I32(cw),
                _I32(cpr), _I32(bool(inclusive)), md))
        bd[...] = t
    return _finish(outs, md, bd, host)


__all__ = ["topk_rows", "topk_global", "cumulative_threshold", "fixed_threshold",
           "topk_rows_impl", "topk_global_impl", "cumulative_impl", "topk_path",
           "cumulative_path", "WARP_MAX", "BLOCK_KEY_BYTES", "CUM_BLOCK_MAX", "G_CHUNK"]
