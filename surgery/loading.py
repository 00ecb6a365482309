"""Load a model for measuring: the options, the device and dtype, the tokenizer, and whether two models compare.

:class:`MeasureOptions` are the options of :func:`surgery.validate.validate`, :func:`surgery.analyze.analyze`
and :func:`surgery.sweep.sweep`; :class:`Settings` is them checked. :func:`load_model` reads any MODEL
argument into a :class:`LoadedModel` on the device asked for.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from surgery.architecture import layer_count, load_config
from surgery.errors import (
    CheckpointError,
    OptionError,
    SurgeryError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from surgery.modeling_wide import code_status
from surgery.source import open_source

PathLike = str | os.PathLike[str]

# torch is imported by the functions that run models, so that importing surgery stays fast.
if TYPE_CHECKING:
    import torch

DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class MeasureOptions(TypedDict, total=False):
    """Options shared by :func:`surgery.validate.validate`, :func:`surgery.analyze.analyze` and :func:`surgery.sweep.sweep`.

    device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available; default).
    dtype: ``auto`` (as stored; default), ``fp32``, ``bf16`` or ``fp16``.
    device_map: ``auto`` to spread a model too large for one device over GPUs and CPU with
        ``accelerate`` (then ``device`` is ignored).
    batch_size: windows per forward pass (default 4).
    max_tokens: token budget of the text set (default 4096).
    seq_len: tokens per window (default 256, capped at the model's context length).
    seed: which windows are drawn from a text longer than the budget (default 0).
    prompts: prompts for greedy-continuation agreement, 0 to skip (default 8).
    new_tokens: tokens generated per prompt (default 32).
    text_field: the JSON field holding the text in a ``.jsonl`` file (default ``text``).
    quiet: no progress bar.
    allow_pickle: accept ``.bin``/``.pt`` weights (loaded with ``weights_only=True``).
    trust_remote_code: allow a model whose code ships in its repository.
    """

    device: str
    dtype: str
    device_map: str | None
    batch_size: int
    max_tokens: int
    seq_len: int
    seed: int
    prompts: int
    new_tokens: int
    text_field: str
    quiet: bool
    allow_pickle: bool
    trust_remote_code: bool


# Upper bounds of the counting options: far above any real measurement, low enough that an absurd
# value (10**12) is refused before it sizes an allocation.
OPTION_MAXIMUM = {"batch_size": 65_536, "max_tokens": 1_000_000_000, "seq_len": 1_048_576,
                  "prompts": 1_000_000, "new_tokens": 1_000_000}


def _whole(options: MeasureOptions, key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if value is None:
        return default
    maximum = OPTION_MAXIMUM[key]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise OptionError(
            f"{key.replace('_', '-')} must be a whole number from {minimum} to {maximum:,}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """:class:`MeasureOptions` checked, with defaults filled in."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    batch_size: int = 4
    max_tokens: int = 4096
    seq_len: int = 256
    seed: int = 0
    prompts: int = 8
    new_tokens: int = 32
    text_field: str = "text"
    quiet: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_options(cls, options: MeasureOptions) -> Settings:
        """Check every option; a bad value is an :class:`~surgery.errors.OptionError`."""
        device = options.get("device") or "auto"
        if device not in DEVICES:
            raise OptionError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        dtype = options.get("dtype") or "auto"
        if dtype not in DTYPES:
            raise OptionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        device_map = options.get("device_map")
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise OptionError(f"device map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
        seed = options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise OptionError(f"seed must be a whole number, got {seed!r}")
        return cls(
            device=device, dtype=dtype, device_map=device_map,
            batch_size=_whole(options, "batch_size", cls.batch_size, 1),
            max_tokens=_whole(options, "max_tokens", cls.max_tokens, 2),
            seq_len=_whole(options, "seq_len", cls.seq_len, 8),
            seed=seed,
            prompts=_whole(options, "prompts", cls.prompts, 0),
            new_tokens=_whole(options, "new_tokens", cls.new_tokens, 1),
            text_field=options.get("text_field") or "text",
            quiet=bool(options.get("quiet", False)),
            allow_pickle=bool(options.get("allow_pickle", False)),
            trust_remote_code=bool(options.get("trust_remote_code", False)),
        )

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` for ``device``; ``auto`` picks CUDA when there is one."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise OptionError("--device cuda was given, but no CUDA device is available", hint="use --device cpu or auto")
        return self.device


@dataclass
class LoadedModel:
    """A model loaded for measuring.

    Attributes:
        name: what the user passed (a path, a repo id, or ``default``).
        path: the local checkpoint directory.
        model: the ``transformers`` model, in eval mode.
        tokenizer: its tokenizer, or None when the directory has none.
        causal: True for a model that generates (a causal LM), False for an encoder.
    """

    name: str
    path: Path
    model: Any
    tokenizer: Any | None
    causal: bool

    @property
    def num_layers(self) -> int:
        from surgery.view import text_config_of

        return int(text_config_of(self.model).num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def max_positions(self) -> int | None:
        from surgery.view import text_config_of

        value = getattr(text_config_of(self.model), "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    def describe(self) -> str:
        """How reports name the model: what the user passed, its class and depth."""
        name = self.name
        if name == "default":
            from surgery.source import DEFAULT_MODEL_FILE

            name = f"{DEFAULT_MODEL_FILE.split('.')[0]} (embedded default)"
        return f"{name} ({type(self.model).__name__}, {self.num_layers} layers)"


def load_model(model: PathLike | None, settings: Settings) -> LoadedModel:
    """Load a MODEL argument (directory, ``.gguf``, Hub id or None for the default) for measuring.

    Args:
        model: as for every verb.
        settings: device, dtype, device map, pickle and remote-code permissions.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        ModelNotFoundError, CheckpointError, PickleRefusedError, UnsupportedArchitectureError,
        OptionError (``cuda`` requested without a CUDA device).

    Example:
        >>> loaded = load_model(None, Settings(device="cpu"))  # doctest: +SKIP
        >>> loaded.num_layers  # doctest: +SKIP
        30
    """
    import torch
    import transformers

    device = None if settings.device_map else settings.resolved_device()  # a missing CUDA fails before any work
    source = open_source(model, allow_pickle=settings.allow_pickle, quiet=settings.quiet)
    config = load_config(source.path, trust_remote_code=settings.trust_remote_code)
    source.fetch(source.pending_files)
    status = code_status(source.path)
    warning = status.warning(source.name) if status is not None else None
    if warning:  # outdated code shipped in a wide-block output can compute wrong results: say so before measuring
        sys.stderr.write(f"surgery: warning: {warning}\n")
    name = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, name, None) if name else None
    dtype = "auto" if settings.dtype == "auto" else getattr(torch, DTYPES[settings.dtype])
    placement: dict[str, Any] = {"device_map": settings.device_map} if settings.device_map else {}
    if settings.quiet:
        transformers.logging.disable_progress_bar()
    loaded: Any
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model_class is None:
                auto = transformers.AutoModelForCausalLM if _is_causal_config(config) else transformers.AutoModel
                loaded = auto.from_pretrained(
                    str(source.path), dtype=dtype, trust_remote_code=settings.trust_remote_code,
                    **placement,
                )
            else:
                loaded = model_class.from_pretrained(
                    str(source.path), dtype=dtype, trust_remote_code=settings.trust_remote_code, **placement
                )
    except SurgeryError:
        raise
    except Exception as exc:  # transformers raises many kinds on a malformed checkpoint; --debug shows the chain
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            str(source.path), f"cannot be loaded by transformers ({type(exc).__name__}: {first})"
        ) from exc
    if device is not None:
        loaded = loaded.to(device)
    loaded.eval()
    return LoadedModel(source.name, source.path, loaded, _load_tokenizer(source.path, settings.trust_remote_code), _is_causal(loaded))


def _is_causal_config(config: Any) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))


def _is_causal(model: Any) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any | None:
    from transformers import AutoTokenizer

    from surgery.checkpoint import check_tokenizer_files, has_tokenizer, tokenizer_error

    if not has_tokenizer(path):  # never let transformers make up an empty tokenizer (5.0 does)
        return None
    check_tokenizer_files(path)  # a malformed tokenizer file is a one-line error naming it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # no tokenizer files: None; present but unloadable: a typed error naming the file
        error = tokenizer_error(path, exc)
        if error is None:
            return None
        raise error from None


def input_device(model: Any) -> torch.device:
    """Where input ids go: the device of the input embeddings (also under a device map)."""
    import torch

    device = torch.device(model.get_input_embeddings().weight.device)
    # Embeddings offloaded by accelerate sit on "meta"; its hooks move CPU inputs where they run.
    return torch.device("cpu") if device.type == "meta" else device


def check_comparable(original: LoadedModel, new: LoadedModel) -> None:
    """Refuse two models whose outputs cannot be compared token by token.

    Raises:
        TokenizerMismatchError: different vocabulary sizes, or tokenizers mapping text differently.
        UnsupportedArchitectureError: a causal LM against an encoder.
    """
    if original.causal != new.causal:
        kinds = {True: "a causal LM", False: "an encoder"}
        raise UnsupportedArchitectureError(
            type(new.model).__name__, f"NEW is {kinds[new.causal]} and ORIGINAL {kinds[original.causal]}; they cannot be compared"
        )
    if original.vocab_size != new.vocab_size:
        raise TokenizerMismatchError(
            f"ORIGINAL has a vocabulary of {original.vocab_size} tokens and NEW of {new.vocab_size}"
        )
    if original.tokenizer is not None and new.tokenizer is not None:
        a, b = original.tokenizer.get_vocab(), new.tokenizer.get_vocab()
        if a != b:
            differ = len(set(a.items()) ^ set(b.items()))
            raise TokenizerMismatchError(f"their tokenizers differ ({differ} token-to-id entries are not shared)")


def num_layers_of(model_dir: Path, settings: Settings) -> int:
    """The layer count in a checkpoint directory's config (its text config for multimodal models)."""
    return layer_count(load_config(model_dir, trust_remote_code=settings.trust_remote_code))
