"""Block masks and selections in files (the array names are those of :mod:`refattn.io`):
``mask`` bool ``[B, H, Qb, Kb]`` (or the index form ``kv_num_blocks``/``kv_indices``) with
its geometry ``block_q``, ``block_k``, ``q_len``, ``k_len``, ``head_kind``; a selection adds
``scores``, ``boundary``, ``forced`` and its array-valued extras as ``extra_<name>``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .core.blockmask import BlockMask
from .core.errors import InputError
from .core.scores import BlockScores, Selection
from .io import MASK_GEOMETRY, _jsonable, _scalar, load, save


def _geometry(data: Mapping[str, Any], name: str, where: Any) -> Any:
    if name in data and isinstance(data[name], np.ndarray):
        if data[name].size != 1:
            raise InputError(f"{where}: {name} must be a scalar (0-d array), got shape "
                             f"{data[name].shape}")
        return _scalar(data[name].reshape(()))
    return data.get("meta", {}).get(name)


def _as_loaded(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    return load(source, layout=None, require=())


def has_mask(data: Mapping[str, Any]) -> bool:
    """True if loaded ``data`` holds a block mask (``mask`` or the index form)."""
    return "mask" in data or ("kv_num_blocks" in data and "kv_indices" in data)


def load_mask(source: str | os.PathLike | Mapping[str, Any], *,
              geometry: Mapping[str, Any] | None = None) -> BlockMask:
    """Rebuild a :class:`BlockMask` from a file (or a dict from :func:`load`).

    Needs ``mask`` (bool ``[B,H,Qb,Kb]``, ``[H,Qb,Kb]`` or ``[Qb,Kb]``) or
    ``kv_num_blocks`` + ``kv_indices``, and the geometry ``block_q``, ``block_k``, ``q_len``,
    ``k_len`` (``head_kind`` defaults to ``"q"``) as 0-d arrays or metadata; ``geometry``
    supplies values the file lacks (e.g. a candidate mask judged on the reference's grid).
    """
    data = _as_loaded(source)
    where = source if not isinstance(source, Mapping) else "mask data"
    if not has_mask(data):
        raise InputError(f"{where}: no block mask found (expected 'mask' or "
                         "'kv_num_blocks' + 'kv_indices')")
    geo: dict[str, Any] = {}
    for name in MASK_GEOMETRY:
        val = _geometry(data, name, where)
        if val is None and geometry is not None:
            val = geometry.get(name)
        geo[name] = val
    if geo["head_kind"] is None:
        geo["head_kind"] = "q"
    lacking = [n for n in MASK_GEOMETRY[:4] if geo[n] is None]
    if lacking:
        raise InputError(f"{where}: block-mask geometry {lacking} missing (store them as 0-d "
                         "arrays or metadata beside the mask)")
    for n in MASK_GEOMETRY[:4]:
        if isinstance(geo[n], bool) or not isinstance(geo[n], (int, np.integer)):
            raise InputError(f"{where}: {n} must be an integer, got {geo[n]!r}")
    kw = {n: (int(geo[n]) if n != "head_kind" else str(geo[n])) for n in MASK_GEOMETRY}
    if "mask" in data:
        return BlockMask(data["mask"], **kw)
    return BlockMask.from_indices(data["kv_num_blocks"], data["kv_indices"], **kw)


def _mask_arrays(mask: BlockMask, path: str | os.PathLike) -> tuple[dict[str, np.ndarray],
                                                                     dict[str, Any]]:
    """``mask`` and its geometry: 0-d arrays in ``.npz`` (``z["block_q"]`` works for any
    reader), metadata in ``.safetensors`` (which has no 0-d tensors or strings)."""
    geo = dict(zip(MASK_GEOMETRY, mask.geometry(), strict=True))
    if str(path).lower().endswith(".npz"):
        arrays = {"mask": np.asarray(mask.mask)}
        arrays.update({n: np.array(geo.pop(n)) for n in MASK_GEOMETRY[:4]})
        return arrays, geo
    return {"mask": np.asarray(mask.mask)}, geo


def save_mask(path: str | os.PathLike, mask: BlockMask,
              metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a :class:`BlockMask` (``mask`` plus its geometry) atomically."""
    if not isinstance(mask, BlockMask):
        raise InputError(f"mask: expected a BlockMask, got {type(mask).__name__}")
    arrays, meta = _mask_arrays(mask, path)
    return save(path, arrays, {**meta, **dict(metadata or {})})


def save_selection(path: str | os.PathLike, selection: Selection,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a :class:`Selection` atomically.

    Arrays: ``mask`` + geometry, ``scores`` (float64 ``[B,H,Qb,Kb]``, geometry in metadata
    ``scores_geometry``), ``boundary`` (``[B,H,Qb]`` or ``[B,H]``), ``forced``, and
    ``extra_<name>`` for every array-valued entry of ``selection.extras``. Metadata:
    ``method``, ``params``, the non-array extras (JSON; other objects as their ``repr``)
    plus ``metadata``.
    """
    if not isinstance(selection, Selection):
        raise InputError(f"selection: expected a Selection, got {type(selection).__name__}")
    arrays, meta = _mask_arrays(selection.mask, path)
    if selection.scores is not None:
        s = selection.scores
        arrays["scores"] = np.asarray(s.scores, dtype=np.float64)
        meta["scores_geometry"] = {"block_q": s.block_q, "block_k": s.block_k,
                                   "q_len": s.q_len, "k_len": s.k_len, "head_kind": s.head_kind}
    if selection.boundary is not None:
        arrays["boundary"] = np.asarray(selection.boundary, dtype=np.float64)
    if selection.forced is not None:
        arrays["forced"] = np.asarray(selection.forced, dtype=bool)
    other: dict[str, Any] = {}
    for key, val in selection.extras.items():
        if isinstance(val, np.ndarray) and val.dtype.kind != "O":
            arrays[f"extra_{key}"] = val
        else:
            other[key] = _jsonable(val)
    if selection.method is not None:
        meta["method"] = selection.method
    meta["params"] = _jsonable(selection.params)
    if other:
        meta["extras"] = other
    meta.update(metadata or {})
    return save(path, arrays, meta)


def load_selection(source: str | os.PathLike | Mapping[str, Any]) -> Selection:
    """Rebuild a :class:`Selection` written by :func:`save_selection` (mask, scores,
    boundary, forced, method, params, array extras; non-array extras as stored JSON)."""
    data = _as_loaded(source)
    meta = data.get("meta", {})
    mask = load_mask(data)
    scores = None
    if "scores" in data:
        g = meta.get("scores_geometry") or dict(zip(MASK_GEOMETRY, mask.geometry(), strict=True))
        try:
            scores = BlockScores(np.asarray(data["scores"], dtype=np.float64),
                                 block_q=int(g["block_q"]), block_k=int(g["block_k"]),
                                 q_len=int(g["q_len"]), k_len=int(g["k_len"]),
                                 head_kind=str(g.get("head_kind", "q")))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"scores_geometry: unreadable ({e})") from None
    extras: dict[str, Any] = dict(meta.get("extras") or {})
    extras.update({k[len("extra_"):]: v for k, v in data.items()
                   if k.startswith("extra_") and isinstance(v, np.ndarray)})
    return Selection(mask=mask, scores=scores,
                     boundary=np.asarray(data["boundary"]) if "boundary" in data else None,
                     forced=np.asarray(data["forced"]) if "forced" in data else None,
                     method=meta.get("method"), params=dict(meta.get("params") or {}),
                     extras=extras)


__all__ = ["has_mask", "load_mask", "save_mask", "save_selection", "load_selection"]
