"""Calling conventions of ``transformers`` that changed between the versions this tool supports.

Each answer is read from the installed library's own signatures and output classes, never from a
version string, so a release that renames something again shows up as one function to adapt here.

* The KV-cache argument of model forwards: ``past_key_values`` up to 5.23, ``cache`` from 5.24
  (the old name is still accepted behind a deprecation warning until 5.40).
* The KV cache on a model's output: the field ``past_key_values``, then ``cache``.

The modelling code that ships inside wide-block checkpoints needs only ``torch`` and
``transformers``, so it carries its own copy of the first rule
(``surgery/modeling_wide/modeling_surgery_parallel.py``: ``CACHE_ARGUMENT``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The name under which ``forward`` takes the KV cache: ``cache`` or ``past_key_values``.

    Args:
        forward: a model's (or layer's) ``forward``; decorators that keep ``__wrapped__`` are seen through.

    Returns:
        ``"cache"`` when the signature names it, otherwise ``"past_key_values"``.

    Example:
        >>> def forward(input_ids, past_key_values=None, use_cache=None): ...
        >>> cache_keyword(forward)
        'past_key_values'
    """
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model: Any, cache: Any, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``model(...)`` that pass ``cache`` under the name ``model.forward`` takes.

    Args:
        model: a ``transformers`` model.
        cache: the KV cache (or ``None``).
        **kwargs: the other arguments, passed through.

    Returns:
        ``kwargs`` plus the cache under its name.

    Example:
        >>> class Old:
        ...     def forward(self, input_ids, past_key_values=None): ...
        >>> with_cache(Old(), None, input_ids=[1])
        {'input_ids': [1], 'past_key_values': None}
    """
    return {**kwargs, cache_keyword(model.forward): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model returned, from the field the installed ``transformers`` names.

    Args:
        output: a model output (a ``ModelOutput`` dataclass).

    Returns:
        The cache, or ``None`` when the output has none.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Out:
        ...     past_key_values: object = "kv"
        >>> output_cache(Out())
        'kv'
    """
    names = {field.name for field in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    for name in CACHE_NAMES:
        if name in names:
            return getattr(output, name)
    return getattr(output, "past_key_values", None)
