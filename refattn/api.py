"""Public functions: layout normalisation at the door, dispatch through the registry."""
from __future__ import annotations

from typing import Any

import numpy as np

from .core.blockmask import BlockMask
from .core.errors import InputError
from .core.layout import (
    as_array,
    as_numpy,
    check_float,
    default_scale,
    from_bhsd,
    is_device_array,
    normalize_qkv,
    to_bhsd,
    to_host,
)
from .core.registry import dispatch, resolve_backend
from .core.scores import Selection
from .reference import attention as _ref_attention  # noqa: F401  (defines the ops)


def attention_mask_of(mask: Any) -> Any:
    """What attention runs for ``mask``: a BlockMask, a token-level mask object, or None.

    A :class:`Selection` gives its ``extras["token_mask"]`` when the method produced a
    token-level structure (MInference's columns and diagonals, PBS's permuted keys), else
    its block mask.
    """
    if isinstance(mask, Selection):
        tm = mask.extras.get("token_mask")
        return tm if tm is not None else mask.mask
    if mask is None or isinstance(mask, BlockMask) or hasattr(mask, "token_rows"):
        return mask
    raise InputError(f"mask: expected a BlockMask or Selection, got {type(mask).__name__}")


def attention(q: Any, k: Any, v: Any, *, mask: Any = None, causal: bool = False,
              softmax_scale: float | None = None, layout: str = "bhsd",
              return_lse: bool = False, backend: str = "numpy") -> Any:
    """Attention, dense (``mask=None``) or block-sparse (a :class:`BlockMask` or
    :class:`Selection`).

    Shapes in ``bhsd``: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]``
    (``layout="bshd"`` / ``"hsd"`` accepted explicitly). GQA: query head ``h`` reads kv head
    ``h // (Hq // Hkv)``. Causal is bottom-right aligned. Blocks outside the mask contribute
    nothing; a row with no visible key gives output 0 and LSE ``-inf``.

    Returns ``out`` in the input layout (float64 from the reference, float32 from kernels),
    and ``lse [B, Hq, Sq]`` (natural log) when ``return_lse``.
    """
    if isinstance(mask, Selection) and mask.extras.get("attention"):
        return _method_attention(q, k, v, mask, causal=causal, softmax_scale=softmax_scale,
                                 layout=layout, return_lse=return_lse, backend=backend)
    m = attention_mask_of(mask)
    if backend == "auto" and m is not None and not isinstance(m, BlockMask):
        backend = "numpy"  # token-level masks (MInference, PBS) run on the reference
    dev_mask = (m.mask,) if isinstance(m, BlockMask) and m.on_device else ()
    chosen = resolve_backend("attention_fwd", backend, (q, k, v) + dev_mask)
    if dev_mask and chosen != "cupy":
        m = m.to_host()   # a device mask given to a CPU backend
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout, device=(chosen == "cupy"))
    scale = default_scale(shape.head_dim, softmax_scale)
    fn = dispatch("attention_fwd", chosen)
    out, lse = fn(q4, k4, v4, m, bool(causal), scale)
    out = from_bhsd(out, layout)
    if layout == "hsd":
        lse = lse[0]
    return (out, lse) if return_lse else out


def _method_attention(q: Any, k: Any, v: Any, sel: Selection, *, causal: bool,
                      softmax_scale: float | None, layout: str, return_lse: bool,
                      backend: str) -> Any:
    """Run a selection whose method computes attention its own way (PSA's pyramid
    attention, PISA's piecewise attention): ``extras["attention"]`` names the function."""
    import importlib
    import inspect

    modname, _, fname = str(sel.extras["attention"]).rpartition(".")
    fn = getattr(importlib.import_module(modname), fname)
    kwargs: dict[str, Any] = dict(softmax_scale=softmax_scale, layout=layout,
                                  return_lse=return_lse, backend=backend)
    if "causal" in inspect.signature(fn).parameters:
        kwargs["causal"] = bool(causal)
    elif causal:
        raise InputError(f"causal: {sel.method or 'this method'}'s attention is not causal")
    return fn(q, k, v, sel, **kwargs)


def attention_backward(q: Any, k: Any, v: Any, out: Any, dout: Any, lse: Any, *,
                       mask: Any = None, causal: bool = False, softmax_scale: float | None = None,
                       layout: str = "bhsd", backend: str = "numpy") -> tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of :func:`attention` given its ``out``, ``lse`` and the
    output gradient ``dout`` (same layout as ``out``). GQA: dk/dv are summed over the query
    heads of each group. Returned in the input layout."""
    chosen = resolve_backend("attention_bwd", backend, (q, k, v))
    dev = chosen == "cupy"
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout, device=dev)
    o4 = to_bhsd(out, layout, "out", device=dev)
    do4 = to_bhsd(dout, layout, "dout", device=dev)
    want = (shape.batch, shape.q_heads, shape.q_len, shape.v_dim)
    for name, x in (("out", o4), ("dout", do4)):
        check_float(x, name)
        if x.shape != want:
            raise InputError(f"{name}: expected shape {want} (bhsd terms), got {x.shape}")
    l = as_array(lse, "lse") if dev else as_numpy(lse, "lse")
    if layout == "hsd" and l.ndim == 2:
        l = l[None]
    if l.shape != want[:3]:
        raise InputError(f"lse: expected shape {want[:3]}, got {l.shape}")
    if bool((l != l).any()) or bool((l == np.inf).any()):
        raise InputError("lse: contains NaN or +inf")
    scale = default_scale(shape.head_dim, softmax_scale)
    fn = dispatch("attention_bwd", chosen)
    dq, dk, dv = fn(q4, k4, v4, o4, do4, l, attention_mask_of(mask), bool(causal), scale)
    return from_bhsd(dq, layout), from_bhsd(dk, layout), from_bhsd(dv, layout)


def select(q: Any, k: Any, method: str, *, v: Any = None, layout: str = "bhsd",
           causal: bool = True, backend: str = "numpy", **params: Any) -> Selection:
    """Run a method's scoring and selection rule; returns a :class:`Selection`.

    Shapes as :func:`attention`. ``params`` are the method's parameters (see
    :func:`methods`); unknown names or out-of-range values raise :class:`InputError`.
    The result goes straight into :func:`attention` (``mask=selection``).

    GPU: ``backend="cupy"`` (or ``"auto"`` with GPU inputs) runs the method's kernels on the
    GPU. Methods with ``device=True`` (:func:`methods`) keep everything there: CuPy inputs
    give a selection whose mask, scores and boundary are CuPy arrays, which
    :func:`attention` with ``backend="cupy"`` consumes without a host round trip. Other
    methods copy q and k to the host for their selection code (their scoring kernels still
    run on the GPU) and return host arrays.
    """
    from .methods import get_method

    info = get_method(method)
    p = info.make_params(**params)
    on_gpu = _wants_device(backend, (q, k, v))
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout, device=on_gpu)
    if on_gpu:
        backend = "cupy"
        if not info.device:      # this method's selection code runs on host arrays; its
            q4, k4 = to_host(q4), to_host(k4)   # scoring kernels still run on the GPU
            v4 = None if v4 is None else to_host(v4)
    if info.needs_v and v4 is None:
        raise InputError(f"method {method!r} needs v")
    sel = info.select(q4, k4, v4, p, causal=bool(causal), backend=backend)
    sel.method = method
    sel.params = dict(vars(p)) if hasattr(p, "__dict__") else {}
    return sel


def _wants_device(backend: str, arrays: tuple[Any, ...]) -> bool:
    """True for ``backend="cupy"``, and for ``"auto"`` with any GPU input."""
    if backend == "cupy":
        return True
    return backend == "auto" and any(is_device_array(a) for a in arrays)


def methods(kind: str | None = None) -> dict[str, dict[str, Any]]:
    """Every registered method: kind, summary, parameters with defaults, paper, code."""
    from .methods import list_methods

    return {n: m.describe() for n, m in list_methods(kind).items()}
