"""Video diffusion-transformer methods (token grids, partitions, pyramid and piecewise
attention): one module per method, each registering itself with
:func:`refattn.methods.base.register_method`; :func:`load_all` (called by
:func:`refattn.methods.load_all`) imports every module whose name has no leading underscore."""
from __future__ import annotations


def load_all() -> None:
    """Import every method module of this package (each registers itself)."""
    from ..methods.base import import_submodules

    import_submodules(__name__, __path__)
