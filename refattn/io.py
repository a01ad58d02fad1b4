"""Reading and writing attention arrays: ``.npy``, ``.npz`` and ``.safetensors``.

Array names (all optional except where a caller requires them):

* ``q`` ``[B, Hq, Sq, D]``, ``k`` ``[B, Hkv, Sk, D]``, ``v`` ``[B, Hkv, Sk, Dv]`` in the
  file's layout (``bhsd``, ``bshd`` or ``hsd``); also ``out``, ``dout``, ``dq``, ``dk``,
  ``dv`` (same layout as q/k/v) and ``lse`` (``[B, H, S]``, or ``[H, S]`` for ``hsd``);
* a block mask: ``mask`` bool ``[B, H, Qb, Kb]`` or the index form ``kv_num_blocks`` /
  ``kv_indices``, with its geometry ``block_q``, ``block_k``, ``q_len``, ``k_len``,
  ``head_kind`` (0-d arrays or metadata);
* anything else is returned as stored.

:func:`load` returns the layout-bearing arrays in canonical ``bhsd``, so ``result["q"]``
is always ``[B, Hq, Sq, D]`` and ``result["lse"]`` ``[B, Hq, Sq]``.

Metadata. In ``.npz`` it lives in 0-d arrays ``meta_<name>`` (str/int/float/bool; other
JSON values as a JSON string in ``meta_<name>__json``); in ``.safetensors`` in the header's
str -> str metadata, each value JSON-encoded (plain strings that are not JSON are kept).
``meta_layout`` (``layout`` in safetensors) states the file's layout.

bf16. ``np.save`` loses the bf16 dtype, so in ``.npy``/``.npz`` a bf16 array ``x`` is stored
as its ``uint16`` bit pattern with a sibling key ``x__dtype = "bfloat16"``; ``.safetensors``
keeps bf16 natively. Files are always read with ``allow_pickle=False`` and written atomically
(a temporary file in the target directory, then :func:`os.replace`).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .core.errors import InputError
from .core.layout import LAYOUTS, to_bhsd

SUFFIXES = (".npy", ".npz", ".safetensors")
#: arrays that share q's layout and become ``[B, H, S, D]`` on load
SEQ_ARRAYS = ("q", "k", "v", "out", "dout", "dq", "dk", "dv")
#: per-row arrays ``[B, H, S]`` (``[H, S]`` in ``hsd``)
ROW_ARRAYS = ("lse",)
MASK_GEOMETRY = ("block_q", "block_k", "q_len", "k_len", "head_kind")
DTYPE_SUFFIX = "__dtype"
META_PREFIX = "meta_"
JSON_SUFFIX = "__json"
RESERVED = ("meta", "layout")


class LayoutWarning(UserWarning):
    """The layout given to :func:`load` disagrees with the layout the file states."""


# ------------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    suf = path.suffix.lower()
    if suf not in SUFFIXES:
        raise InputError(f"path: expected a file ending in one of {SUFFIXES}, got {str(path)!r}")
    return suf


def _ml_dtype(name: str, key: str) -> np.dtype:
    """The ``ml_dtypes`` dtype called ``name`` (``bfloat16``, ``float8_e4m3fn``, ...)."""
    import ml_dtypes

    dt = getattr(ml_dtypes, str(name), None)
    if dt is None:
        raise InputError(f"{key}{DTYPE_SUFFIX}: unknown dtype {name!r} (expected an ml_dtypes "
                         "type such as 'bfloat16')")
    return np.dtype(dt)


def _scalar(x: np.ndarray) -> Any:
    v = x.item()
    return v.decode() if isinstance(v, bytes) else v


def _jsonable(v: Any) -> Any:
    """``v`` with NumPy scalars/arrays made JSON-friendly; other objects become ``repr``."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)


def _rows_to_bhsd(x: np.ndarray, layout: str, name: str) -> np.ndarray:
    want = 2 if layout == "hsd" else 3
    if x.ndim != want:
        raise InputError(f"{name}: layout {layout!r} needs a {want}-d array "
                         f"({'[H, S]' if layout == 'hsd' else '[B, H, S]'}), got shape {x.shape}")
    return x[None] if layout == "hsd" else x


def _resolve_layout(layout: str | None, meta: Mapping[str, Any], path: Any) -> str:
    stated = meta.get("layout")
    stated_l = str(stated).lower() if stated is not None else None
    if stated_l is not None and stated_l not in LAYOUTS:
        warnings.warn(f"{path}: the file states layout {stated!r}, which is not one of {LAYOUTS}; "
                      "ignoring it", LayoutWarning, stacklevel=3)
        stated_l = None
    if layout is None:
        return stated_l or "bhsd"
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise InputError(f"layout: expected one of {LAYOUTS} or None, got {layout!r}")
    layout = layout.lower()
    if stated_l is not None and stated_l != layout:
        warnings.warn(f"{path}: reading with layout={layout!r}, but the file states layout "
                      f"{stated!r}", LayoutWarning, stacklevel=3)
    return layout


# --------------------------------------------------------------------------------- read
def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise InputError(f"{path}: expected an .npz archive, found a single .npy array")
        try:
            raw = {key: z[key] for key in z.files}
        finally:
            z.close()
    except InputError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    for key, a in raw.items():
        if key.startswith(META_PREFIX) and a.ndim == 0:
            name = key[len(META_PREFIX):]
            if name.endswith(JSON_SUFFIX):
                try:
                    meta[name[: -len(JSON_SUFFIX)]] = json.loads(str(a.item()))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: {key} is not valid JSON ({e})") from None
            else:
                meta[name] = _scalar(a)
        elif key.endswith(DTYPE_SUFFIX) and a.ndim == 0:
            continue
        else:
            arrays[key] = a
    for key in list(arrays):
        tag = raw.get(key + DTYPE_SUFFIX)
        if tag is not None:
            dt = _ml_dtype(_scalar(tag), key)
            a = arrays[key]
            if a.dtype.itemsize != dt.itemsize or a.dtype.kind not in "iu":
                raise InputError(f"{path}: {key} is tagged {_scalar(tag)!r} but stored as "
                                 f"{a.dtype}; expected uint{8 * dt.itemsize} bit patterns")
            arrays[key] = a.view(dt)
    return arrays, meta


def _read_npy(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise InputError(f"{path}: expected a single .npy array, found an .npz archive")
    return {"array": a}, {}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import ml_dtypes  # noqa: F401  (registers "bfloat16" with NumPy; safetensors looks it up by name)

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError, OSError, TypeError (dtype) ...
        raise InputError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})"
                         ) from None
    meta: dict[str, Any] = {}
    for key, text in header.items():
        try:
            meta[key] = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            meta[key] = text  # a plain string written by another tool
    return arrays, meta


def read_raw(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays exactly as stored (bf16 restored) and the metadata dict; no layout handling."""
    p = Path(path)
    suf = _suffix(p)
    if not p.exists():
        raise InputError(f"path: file not found: {str(p)!r}")
    if not p.is_file():
        raise InputError(f"path: not a regular file: {str(p)!r}")
    reader = {".npy": _read_npy, ".npz": _read_npz, ".safetensors": _read_safetensors}[suf]
    return reader(p)


def load(path: str | os.PathLike, layout: str | None = "bhsd", *,
         require: Iterable[str] = ("q", "k", "v")) -> dict[str, Any]:
    """Read an array file; return its arrays with q/k/v/out/lse in canonical ``bhsd``.

    Parameters
    ----------
    path: ``.npy`` (one array, returned as ``"array"``), ``.npz`` or ``.safetensors``.
    layout: the layout of q/k/v/out in the file (``"bhsd"``, ``"bshd"`` or ``"hsd"``, which
        adds ``B = 1``). ``None`` takes the layout the file states (``meta_layout``) and
        ``"bhsd"`` when it states none. A given layout that disagrees with the file's
        statement is used, with a :class:`LayoutWarning`.
    require: names that must be present (default ``("q", "k", "v")``).

    Returns a dict: every array by name (``q [B,Hq,Sq,D]``, ``k``/``v [B,Hkv,Sk,D]``,
    ``out [B,Hq,Sq,Dv]``, ``lse [B,Hq,Sq]``, others as stored), ``"meta"`` (the metadata
    dict) and ``"layout"`` (the layout the file was read with). Raises :class:`InputError`
    for a missing or unreadable file, a missing required array or a wrong rank.
    """
    p = Path(path)
    arrays, meta = read_raw(p)
    return from_raw(arrays, meta, layout, require=require, where=str(p))


def from_raw(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], layout: str | None = "bhsd",
             *, require: Iterable[str] = ("q", "k", "v"), where: str = "input") -> dict[str, Any]:
    """The second half of :func:`load`: check ``require``, resolve the layout and convert
    the arrays of :func:`read_raw` (``where`` names the source in messages)."""
    p = where
    meta = dict(meta)
    for name in RESERVED:
        if name in arrays:
            raise InputError(f"{p}: array name {name!r} is reserved; rename it")
    missing = [n for n in require if n not in arrays]
    if missing:
        hint = " (a .npy file holds one array; use .npz or .safetensors)" if "array" in arrays else ""
        raise InputError(f"{p}: missing required array(s) {missing}; found {sorted(arrays)}{hint}")
    used = _resolve_layout(layout, meta, p)
    out: dict[str, Any] = {}
    try:
        for name, a in arrays.items():
            if name in SEQ_ARRAYS:
                out[name] = to_bhsd(a, used, name)
            elif name in ROW_ARRAYS:
                out[name] = _rows_to_bhsd(a, used, name)
            else:
                out[name] = a
    except InputError as e:
        stated = meta.get("layout")
        hint = f" (the file states layout {stated!r})" if stated is not None else ""
        raise InputError(f"{p}: {e}{hint}") from None
    out["meta"] = meta
    out["layout"] = used
    return out


# -------------------------------------------------------------------------------- write
def _npz_payload(arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    payload: dict[str, np.ndarray] = {}
    for name, x in arrays.items():
        a = np.asarray(x)
        if a.dtype.kind == "O":
            raise InputError(f"arrays[{name!r}]: object arrays cannot be saved (no pickle)")
        if str(a.dtype) == "bfloat16" or str(a.dtype).startswith("float8_"):
            payload[name] = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint8)
            payload[name + DTYPE_SUFFIX] = np.array(str(a.dtype))
        else:
            payload[name] = a
    for key, v in metadata.items():
        if isinstance(v, (str, bool, int, float, np.generic)):
            payload[META_PREFIX + key] = np.array(v)
        else:
            payload[META_PREFIX + key + JSON_SUFFIX] = np.array(json.dumps(_jsonable(v)))
    return payload


def _safetensors_bytes(arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> bytes:
    from safetensors.numpy import save as st_save

    tensors = {}
    for name, x in arrays.items():
        a = np.asarray(x)
        if a.dtype.kind in "OUS":
            raise InputError(f"arrays[{name!r}]: .safetensors holds numeric arrays only, got "
                             f"{a.dtype}; put strings in metadata")
        tensors[name] = np.ascontiguousarray(a)
    meta = {str(k): json.dumps(_jsonable(v)) for k, v in metadata.items()}
    return st_save(tensors, metadata=meta or None)


def save(path: str | os.PathLike, arrays: Mapping[str, Any],
         metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``arrays`` (name -> array) and ``metadata`` to ``path`` atomically.

    The format follows the suffix: ``.npz``, ``.safetensors``, or ``.npy`` (exactly one
    array, no metadata). bf16 as described in the module docstring. The file appears
    complete or not at all: a temporary file in the same directory is written, flushed and
    renamed over ``path``; on any error it is removed and ``path`` is left untouched.
    Returns the path written.
    """
    p = Path(path)
    suf = _suffix(p)
    metadata = dict(metadata or {})
    for name in arrays:
        if not isinstance(name, str) or not name or name in RESERVED or \
                name.startswith(META_PREFIX) or name.endswith(DTYPE_SUFFIX):
            raise InputError(f"arrays: invalid array name {name!r} (empty, reserved "
                             f"{RESERVED}, or using the prefix {META_PREFIX!r} / suffix "
                             f"{DTYPE_SUFFIX!r})")
    if suf == ".npy" and (len(arrays) != 1 or metadata):
        raise InputError(f"path: a .npy file holds exactly one array and no metadata, got "
                         f"{len(arrays)} arrays and {len(metadata)} metadata entries; use .npz")
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"path: directory does not exist: {str(directory)!r}")
    # Build the payload first, so that bad input fails before any file is created.
    if suf == ".safetensors":
        blob: bytes | None = _safetensors_bytes(arrays, metadata)
        payload = None
    else:
        blob = None
        payload = _npz_payload(arrays, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if blob is not None:
                f.write(blob)
            elif suf == ".npy":
                np.save(f, next(iter(payload.values())), allow_pickle=False)  # type: ignore[union-attr]
            else:
                np.savez(f, **payload)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


# Block masks and selections (refattn/io_masks.py), re-exported here.
from .io_masks import (  # noqa: E402,F401
    has_mask,
    load_mask,
    load_selection,
    save_mask,
    save_selection,
)

__all__ = ["load", "save", "read_raw", "from_raw", "load_mask", "save_mask", "save_selection",
           "load_selection", "has_mask", "LayoutWarning", "SUFFIXES"]
