"""Keep BLAS single-threaded while a parallel Numba kernel runs.

``np.dot`` inside ``@njit`` calls SciPy's BLAS (``scipy.linalg.cython_blas``, OpenBLAS in
the wheels). Called from every ``prange`` worker, a multi-threaded OpenBLAS adds its own
threads on top of Numba's: on a 2-core machine one dense forward took 0.3 s with
``OPENBLAS_NUM_THREADS=1`` and 0.8-5 s with 2 (measured here). The environment variable
only works before the library loads, so :func:`single_threaded_blas` sets OpenBLAS's thread
count to 1 through its C API for the duration of a kernel call and restores it afterwards
(nesting- and thread-safe). Where no OpenBLAS is found (other BLAS vendors, non-Linux) it
does nothing.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from typing import Iterator

_SETTERS = ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads", "openblas_set_num_threads64_")
_GETTERS = ("scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
            "openblas_get_num_threads", "openblas_get_num_threads64_")

_lock = threading.Lock()
_depth = 0
_saved: list[int] = []
_libs: list[tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]] | None = None  # (get, set) per library


def _find(lib: ctypes.CDLL, names: tuple[str, ...]) -> ctypes._CFuncPtr | None:
    for n in names:
        fn = getattr(lib, n, None)
        if fn is not None:
            return fn
    return None


def openblas_libraries() -> list[tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """(get_num_threads, set_num_threads) of every OpenBLAS loaded in this process."""
    global _libs
    if _libs is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS that Numba calls)

        found = []
        try:
            with open("/proc/self/maps") as f:
                fields = [ln.split() for ln in f]
            paths = sorted({fl[-1] for fl in fields if len(fl) >= 6 and "/" in fl[-1]
                            and "openblas" in fl[-1].rsplit("/", 1)[-1].lower()
                            and ".so" in fl[-1].rsplit("/", 1)[-1]})
        except OSError:
            paths = []
        for p in paths:
            try:
                lib = ctypes.CDLL(p)
            except OSError:
                continue
            get, put = _find(lib, _GETTERS), _find(lib, _SETTERS)
            if get is not None and put is not None:
                get.restype, put.restype, put.argtypes = ctypes.c_int, None, [ctypes.c_int]
                found.append((get, put))
        _libs = found
    return _libs


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Within the block, every loaded OpenBLAS runs single-threaded."""
    global _depth
    libs = openblas_libraries()
    with _lock:
        if _depth == 0:
            _saved[:] = [get() for get, _ in libs]
            for _, put in libs:
                put(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for (_, put), n in zip(libs, _saved, strict=True):
                    put(n)
