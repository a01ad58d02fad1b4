"""KV-cache token importance: which cached tokens a method keeps (reference, float64).

One module per method, each registering itself with :func:`refattn.methods.register_method`
(``kind="kv-cache"``) and defining its scoring op in the registry:

* :mod:`.snapkv` -- SnapKV (observation window, pooled votes);
* :mod:`.h2o` -- H2O heavy hitters (real drop, masking simulation, single-forward);
* :mod:`.vatp` -- value-aware token pruning (H2O / Scissorhands settings);
* :mod:`.streamingllm` -- attention sinks + recent window, with position re-encoding;
* :mod:`.presses` -- kvpress scorers (knorm, tova, observed/expected attention, random, ...);
* :mod:`.caote` -- CAOTE / FastCAOTE output-error scores on top of another score;
* :mod:`.simulate` -- a decode simulator (:func:`run_kv`);
* :mod:`.block_attention`, :mod:`.blockbert` -- the static block masks of Block-Attention (RAG)
  and BlockBERT (registered with ``kind="static"``).

The kept tokens are a :class:`refattn.core.keepset.KeepSet`.
"""

from __future__ import annotations

import importlib

METHOD_MODULES = (
    "snapkv",
    "h2o",
    "vatp",
    "streamingllm",
    "presses",
    "caote",
    "block_attention",
    "blockbert",
)


def load_all() -> None:
    """Import every method module (each registers itself)."""
    for name in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def run_kv(*args, **kwargs):  # noqa: D401 - thin forwarder, documented in .simulate
    """See :func:`refattn.kvcache.simulate.run_kv`."""
    from .simulate import run_kv as _run

    return _run(*args, **kwargs)


__all__ = ["METHOD_MODULES", "load_all", "run_kv"]
