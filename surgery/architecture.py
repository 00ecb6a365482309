"""What a model's layer stack is, derived from the model itself rather than a per-model table.

Two ways, with the same result:

* From the files alone (no torch, no transformers: the write path starts in milliseconds), when
  ``config.json`` states everything: its ``model_type`` is one of :data:`STATED_IN_CONFIG` (families
  whose config class derives no per-layer field beyond the ones listed there), those fields are
  present, the layer count is one unambiguous key, and exactly one tensor-name prefix
  ``<prefix>.<i>.`` covers layers ``0..n-1`` with the same tensor names in every layer.
* Otherwise through transformers: the model is built on the meta device from its config (no
  weights read, no memory used), and the layer stack is the ``nn.ModuleList`` of
  ``num_hidden_layers`` identical blocks holding the most parameters. Its checkpoint prefix
  (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers``,
  ``encoder.layer`` ...) is then matched against the tensor names.

The config follows the plan: the layer-count field is set, and every per-layer list
(``layer_types``, ``no_rope_layers``, ...: any list with one scalar per layer) is permuted with
the layers. Settings that give a layer a behaviour by *position* rather than by list are the
small table of exceptions below: a plan that would change such a behaviour is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint import is_count, read_json_object
from surgery.errors import CheckpointError, PlanError, SurgeryError, UnsupportedArchitectureError
from surgery.plan import MAX_POSITIONS, Plan

# Config keys that name the layer count, in the order they are tried (after attribute_map).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
# Per-layer lists whose values are layer *indices* (not one value per layer): remapped, not permuted.
INDEX_LIST_FIELDS = ("mlp_only_layers",)
# Lists that may happen to have num_layers entries but are not per-layer.
NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}

# Model types whose config class, when config.json lacks them, derives exactly these per-layer
# fields (empty: none) and no position-dependent setting (POSITIONAL_SETTINGS) by default. For
# these, config.json and the tensor names alone describe the stack once the listed fields are
# present, so the write path needs neither torch nor transformers. Any other type (or a config
# with remote code, a nested text config, or a field missing) is derived through transformers.
# tests/test_architecture.py checks every row against the installed transformers.
STATED_IN_CONFIG: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "stablelm",
         "starcoder2", "olmo", "olmo2", "granite", "gemma", "cohere", "glm", "helium", "bert", "roberta",
         "xlm-roberta", "electra", "distilbert"),
        (),
    ),
    "qwen2": ("layer_types",),
    "qwen3": ("layer_types",),
    "qwen3_moe": ("mlp_only_layers",),
    "gemma2": ("layer_types",),
    "gemma3_text": ("layer_types",),
    "cohere2": ("layer_types",),
    "ministral": ("layer_types",),
    "olmo3": ("layer_types",),
    "smollm3": ("layer_types", "no_rope_layers"),
}


def _kind_by_period(field: str, offset: int = 1) -> Callable[[dict[str, Any], int], Any]:
    def kind(cfg: dict[str, Any], i: int) -> Any:
        step = int(cfg.get(field) or 1)
        return (i + offset) % step == 0 if step > 1 else True

    return kind


# Settings that make a layer's behaviour depend on its position; a plan must not change it.
# field -> (is the setting active?, the behaviour of the layer at position i)
POSITIONAL_SETTINGS: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any], int], Any]]] = {
    # GPT-2: attention scores scaled by 1 / (layer_idx + 1).
    "scale_attn_by_inverse_layer_idx": (lambda c: bool(c.get("scale_attn_by_inverse_layer_idx")), lambda c, i: i),
    # Qwen-MoE: every decoder_sparse_step-th layer is sparse.
    "decoder_sparse_step": (lambda c: int(c.get("decoder_sparse_step") or 1) > 1, _kind_by_period("decoder_sparse_step")),
    # Llama 4: every interleave_moe_layer_step-th layer is MoE.
    "interleave_moe_layer_step": (
        lambda c: int(c.get("interleave_moe_layer_step") or 1) > 1,
        _kind_by_period("interleave_moe_layer_step"),
    ),
    # DeepSeek: the first k layers are dense, then every moe_layer_freq-th is MoE.
    "first_k_dense_replace": (
        lambda c: int(c.get("first_k_dense_replace") or 0) > 0 or int(c.get("moe_layer_freq") or 1) > 1,
        lambda c, i: i >= int(c.get("first_k_dense_replace") or 0) and i % int(c.get("moe_layer_freq") or 1) == 0,
    ),
}


@dataclass(frozen=True)
class Architecture:
    """The layer stack of one model, as found in its config and checkpoint.

    Attributes:
        model_type: the config's ``model_type`` (of the text config for multimodal models).
        class_name: the model class, from ``config.architectures``.
        num_layers: how many blocks the stack has.
        layer_prefix: the checkpoint name prefix of the stack, e.g. ``model.layers``.
        module_path: the stack's module path in the model, e.g. ``model.layers``.
        count_key: the config key holding the layer count, e.g. ``num_hidden_layers`` or ``n_layer``.
        config_scope: the nested config holding the stack (``("text_config",)``) or ``()``.
        per_layer: config fields with one value per layer (after the config's own derivations).
        index_lists: config fields listing layer indices, such as ``mlp_only_layers``.
        config: the full config as a plain dict, after derivations, for reports.
        from_files: True when config.json and the tensor names sufficed (:func:`detect_from_files`):
            then ``config`` is config.json as written, and ``module_path`` is the checkpoint prefix.
    """

    model_type: str
    class_name: str
    num_layers: int
    layer_prefix: str
    module_path: str
    count_key: str
    config_scope: tuple[str, ...]
    per_layer: dict[str, tuple[Any, ...]]
    index_lists: dict[str, tuple[int, ...]]
    config: dict[str, Any]
    from_files: bool = False

    def layer_of(self, tensor_name: str) -> int | None:
        """The source layer index of a checkpoint tensor, or None for non-layer tensors."""
        if not tensor_name.startswith(self.layer_prefix + "."):
            return None
        head = tensor_name[len(self.layer_prefix) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def rename(self, tensor_name: str, new_index: int) -> str:
        """The tensor's name at a new layer position."""
        rest = tensor_name[len(self.layer_prefix) + 1 :].split(".", 1)[1]
        return f"{self.layer_prefix}.{new_index}.{rest}"

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan made for another layer count, or one that moves a positional behaviour.

        Raises:
            PlanError: the plan's source layer count differs from this model's.
            UnsupportedArchitectureError: a setting in :data:`POSITIONAL_SETTINGS` would change.
        """
        if plan.num_source_layers != self.num_layers:
            raise PlanError(
                f"the plan was made for a model with {plan.num_source_layers} layers, "
                f"but this model has {self.num_layers}"
            )
        scoped = self._scoped(self.config)
        for field, (active, kind) in POSITIONAL_SETTINGS.items():
            if field in scoped and active(scoped):
                moved = [(j, i) for j, i in plan.mapping() if kind(scoped, j) != kind(scoped, i)]
                if moved:
                    j, i = moved[0]
                    raise UnsupportedArchitectureError(
                        self.model_type,
                        f"{field}={scoped[field]!r} makes a layer's behaviour depend on its position, "
                        f"and the plan moves layer {i} to position {j}, which behaves differently",
                        hint="choose a plan that keeps such layers at positions of the same kind",
                    )

    def _scoped(self, config: dict[str, Any]) -> dict[str, Any]:
        for key in self.config_scope:
            config = config[key]
        return config

    def rewrite_config(self, raw: dict[str, Any], plan: Plan) -> dict[str, Any]:
        """The config.json dict of the new model: layer count and per-layer fields follow the plan.

        Args:
            raw: the source ``config.json`` as read from disk (not modified).
            plan: the plan being applied.

        Returns:
            A new dict; keys not about layers are untouched and keep their order.
        """
        new = json.loads(json.dumps(raw))
        scoped = self._scoped(new)
        stated = scoped.get(self.count_key)
        scoped[self.count_key] = len(plan)
        # A config may state the count under two names (num_hidden_layers and n_layer, say); an alias
        # left at the old count would contradict the new one. Keys holding another number mean
        # something else and are left alone.
        for key in LAYER_COUNT_KEYS:
            if key != self.count_key and type(scoped.get(key)) is int and scoped.get(key) == stated:
                scoped[key] = len(plan)
        for field, values in self.per_layer.items():
            scoped[field] = [values[i] for _, i in plan.mapping()]
        for field, indices in self.index_lists.items():
            scoped[field] = [j for j, i in plan.mapping() if i in set(indices)]
        return new

    def expected_fields(self, plan: Plan) -> dict[str, list[Any]]:
        """What each per-layer field must read after loading the rewritten config."""
        return {field: [values[i] for _, i in plan.mapping()] for field, values in self.per_layer.items()}


# Config keys whose value is a count or a size wherever they appear (also in nested configs):
# a whole number or null. A string ("30"), a float or a list there is refused before transformers
# sees it, because config classes do arithmetic with them.
COUNT_KEYS = (
    *LAYER_COUNT_KEYS, "hidden_size", "n_embd", "d_model", "intermediate_size", "ffn_dim", "n_inner",
    "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "n_positions", "sliding_window", "max_window_layers",
)
# Keys holding a nested config: an object or null.
NESTED_CONFIG_KEYS = ("text_config", "language_config", "llm_config", "vision_config", "audio_config")


def read_config(model_dir: Path) -> dict[str, Any]:
    """A directory's ``config.json`` as a dict, checked before anything uses it.

    Checked: a regular UTF-8 file holding a JSON object; ``model_type`` a string;
    ``architectures`` a list of strings; nested configs (``text_config`` ...) objects; every
    count or size (:data:`COUNT_KEYS`, at any depth) a non-negative whole number or null; a
    layer count at most :data:`~surgery.plan.MAX_POSITIONS`.

    Args:
        model_dir: the model directory.

    Returns:
        The parsed config.

    Raises:
        CheckpointError: the file is missing, not UTF-8, not JSON, not an object, or a value
            has the wrong type; the message names the file and the key.

    Example:
        >>> read_config(Path("no/such/dir"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        surgery.errors.CheckpointError: no/such/dir/config.json: is missing
    """
    path = model_dir / "config.json"
    config = read_json_object(path, "config")
    _check_config_values(path, config, "")
    return config


def _check_config_values(path: Path, config: dict[str, Any], scope: str) -> None:
    def wrong(key: str, value: object, expected: str) -> CheckpointError:
        shown = repr(value) if isinstance(value, (str, int, float)) and len(repr(value)) <= 40 else type(value).__name__
        return CheckpointError(
            str(path), f"config key {scope + key!r} is {shown}, not {expected}",
            hint="fix config.json: counts and sizes are JSON numbers such as 30, not strings such as \"30\"",
        )

    if "model_type" in config and not isinstance(config["model_type"], str):
        raise wrong("model_type", config["model_type"], "a string")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise wrong("architectures", architectures, "a list of class names")
    for key in COUNT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if not is_count(value):
            raise wrong(key, value, "a non-negative whole number")
        if key in LAYER_COUNT_KEYS and value > MAX_POSITIONS:
            raise wrong(key, value, f"a layer count this tool handles (at most {MAX_POSITIONS:,})")
    for key, value in config.items():
        if isinstance(value, dict):
            _check_config_values(path, value, f"{scope}{key}.")
        elif key in NESTED_CONFIG_KEYS and value is not None:
            raise wrong(key, value, "an object (a nested config)")


def load_config(model_dir: Path, *, trust_remote_code: bool = False) -> Any:
    """Load a directory's config with ``transformers``, after :func:`read_config` has checked it.

    Args:
        model_dir: the model directory.
        trust_remote_code: allow a config class that ships in the model repository.

    Returns:
        The ``transformers`` config object.

    Raises:
        CheckpointError: a malformed ``config.json`` (see :func:`read_config`), or one that
            ``transformers`` refuses for any other reason.
        UnsupportedArchitectureError: a model type ``transformers`` does not know, or remote code
            that is not trusted.
    """
    from transformers import AutoConfig

    read_config(model_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except SurgeryError:
        raise
    except ValueError as exc:
        model_type = _raw_model_type(model_dir)
        if "trust_remote_code" in str(exc):
            raise UnsupportedArchitectureError(
                model_type, "its code lives in the model repository, and remote code is not run unless asked",
                hint="pass --trust-remote-code if you trust this model's code",
            ) from None
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type in CONFIG_MAPPING:  # a known type whose config class refused a value
            raise _unreadable_config(model_dir, exc) from None
        raise UnsupportedArchitectureError(
            model_type, f"transformers does not know it ({_first_line(exc)})",
            hint="upgrade transformers, or pass --trust-remote-code for a model that ships its own code",
        ) from None
    except OSError as exc:
        raise CheckpointError(str(model_dir), f"config.json cannot be read ({_first_line(exc)})") from None
    except Exception as exc:  # a config class choking on a malformed value: bad input, not a bug here
        raise _unreadable_config(model_dir, exc) from None


def count_layers(model_dir: Path, *, trust_remote_code: bool = False) -> int:
    """The layer count of the model in ``model_dir``: from config.json when it states it, else via transformers.

    Args:
        model_dir: a directory with ``config.json``.
        trust_remote_code: allow a config class that ships in the model repository.

    Returns:
        The layer count (of the text config for multimodal models).

    Raises:
        CheckpointError: a malformed ``config.json``.
        UnsupportedArchitectureError: no layer count, or a model type transformers does not know.

    Example:
        >>> count_layers(Path("no/such/dir"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        surgery.errors.CheckpointError: no/such/dir/config.json: is missing
    """
    stated = stated_layer_count(read_config(model_dir))
    if stated is not None:
        return stated[1]
    return layer_count(load_config(model_dir, trust_remote_code=trust_remote_code))


def layer_count(config: Any) -> int:
    """The layer count of a loaded config (of its text config for multimodal models).

    Args:
        config: from :func:`load_config`.

    Returns:
        ``num_hidden_layers``, a whole number from 1 to :data:`~surgery.plan.MAX_POSITIONS`.

    Raises:
        UnsupportedArchitectureError: the config has no such layer count.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    if not is_count(count) or not 1 <= count <= MAX_POSITIONS:
        raise UnsupportedArchitectureError(
            str(getattr(text_config, "model_type", None) or "unknown"),
            f"its config has no layer count (num_hidden_layers is {count!r})",
        )
    return int(count)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _unreadable_config(model_dir: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        str(model_dir / "config.json"), f"transformers cannot read this config ({type(exc).__name__}: {_first_line(exc)})"
    )


def _raw_model_type(model_dir: Path) -> str:
    try:
        return str(read_json_object(model_dir / "config.json", "config").get("model_type", "unknown"))
    except CheckpointError:
        return "unknown"


def _build_on_meta(config: Any, *, trust_remote_code: bool) -> Any:
    """Instantiate the model's class on the meta device: shapes and module tree, no memory."""
    import torch
    import transformers

    name = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, name, None) if name else None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_class is not None:
            try:
                return model_class(config)
            except Exception as exc:  # a config the class cannot build from: bad input, one line
                raise UnsupportedArchitectureError(
                    str(getattr(config, "model_type", "unknown")),
                    f"{name} cannot be built from this config.json ({type(exc).__name__}: {_first_line(exc)})",
                ) from None
        auto_map = getattr(config, "auto_map", None) or {}
        for auto in ("AutoModelForCausalLM", "AutoModel"):
            if auto in auto_map and not trust_remote_code:
                continue
            try:
                return getattr(transformers, auto).from_config(config, trust_remote_code=trust_remote_code)
            except ValueError:
                continue
    raise UnsupportedArchitectureError(
        getattr(config, "model_type", "unknown"), f"no transformers model class for {name or 'this config'}"
    )


def _find_stack(model: Any, num_layers: int) -> str:
    """The module path of the ModuleList of ``num_layers`` same-class blocks with most parameters."""
    import torch

    best: tuple[int, str] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) != num_layers:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path)
    if best is None:
        raise UnsupportedArchitectureError(
            type(model).__name__, f"no list of {num_layers} identical layers found in the model"
        )
    return best[1]


def _match_prefix(module_path: str, base_prefix: str, tensor_names: Iterable[str], num_layers: int) -> str:
    """The checkpoint prefix of the stack: the module path, with or without the base-model prefix."""
    names = list(tensor_names)
    candidates = [module_path]
    if base_prefix and module_path.startswith(base_prefix + "."):
        candidates.append(module_path[len(base_prefix) + 1 :])
    if base_prefix:
        candidates.append(f"{base_prefix}.{module_path}")
    for prefix in candidates:
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        found = {int(m.group(1)) for name in names if (m := pattern.match(name))}
        if found:
            if found != set(range(num_layers)):
                missing = sorted(set(range(num_layers)) - found)
                extra = sorted(found - set(range(num_layers)))
                raise CheckpointError(
                    prefix,
                    f"the checkpoint's layers do not match the config's {num_layers} "
                    f"(missing {missing[:5]}, unexpected {extra[:5]})",
                )
            return prefix
    raise CheckpointError(
        module_path, f"no checkpoint tensors found under {' or '.join(repr(c + '.N') for c in candidates)}"
    )


def layer_fields(
    derived: dict[str, Any], num_layers: int
) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[int, ...]]]:
    """The config fields that follow the layers: one value per layer, and lists of layer indices.

    Args:
        derived: the (text) config as a dict, after the config class's own derivations.
        num_layers: the layer count.

    Returns:
        ``(per_layer, index_lists)`` as in :class:`Architecture`.

    Example:
        >>> layer_fields({"layer_types": ["a", "b"], "mlp_only_layers": [1]}, 2)
        ({'layer_types': ('a', 'b')}, {'mlp_only_layers': (1,)})
    """
    per_layer: dict[str, tuple[Any, ...]] = {}
    index_lists: dict[str, tuple[int, ...]] = {}
    for field, value in derived.items():
        if field in INDEX_LIST_FIELDS and isinstance(value, list):
            index_lists[field] = tuple(int(v) for v in value)
        elif (
            field not in NOT_PER_LAYER
            and isinstance(value, list)
            and len(value) == num_layers
            and all(isinstance(v, (str, int, float, bool)) or v is None for v in value)
        ):
            per_layer[field] = tuple(value)
    return per_layer, index_lists


def detect(
    model_dir: Path, tensor_names: Iterable[str], *, trust_remote_code: bool = False, with_transformers: bool = False
) -> Architecture:
    """Find the layer stack of the model in ``model_dir``.

    From config.json and the tensor names alone when they suffice (:func:`detect_from_files`),
    otherwise through transformers' config class and a model built on the meta device.

    Args:
        model_dir: a directory with ``config.json``.
        tensor_names: the checkpoint's tensor names (from the index or the headers).
        trust_remote_code: allow a model whose code ships in its repository.
        with_transformers: always derive through transformers (for callers that need the config
            after the config class's derivations, such as the wide-block writer).

    Returns:
        The :class:`Architecture`.

    Raises:
        UnsupportedArchitectureError: unknown model type, or no layer stack.
        CheckpointError: the checkpoint's layers disagree with the config.

    Example:
        >>> from surgery.checkpoint import read_tensor_index  # doctest: +SKIP
        >>> arch = detect(d, read_tensor_index(d))  # doctest: +SKIP
        >>> arch.layer_prefix  # doctest: +SKIP
        'model.layers'
    """
    if _raw_model_type(model_dir) == "surgery_parallel":
        raise UnsupportedArchitectureError(
            "surgery_parallel", "this checkpoint's parallel groups are already merged into wide blocks (surgery parallel), "
            "so its layers are not a stack of identical layers to rewrite",
            hint="rewrite its source instead: surgery apply SOURCE OUT --recipe THIS_DIR (its surgery-recipe.yaml)",
        )
    names = list(tensor_names)
    raw = read_config(model_dir)
    if not with_transformers:
        found = detect_from_files(raw, names)
        if found is not None:
            return found
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scope: tuple[str, ...] = ()
    if text_config is not config:
        key = next((k for k in ("text_config", "language_config", "llm_config") if isinstance(raw.get(k), dict)), None)
        if key is None:
            raise UnsupportedArchitectureError(
                str(getattr(text_config, "model_type", None) or raw.get("model_type", "unknown")),
                "its config.json has no nested text config (text_config) holding the layer stack",
            )
        scope = (key,)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    model_type = str(getattr(text_config, "model_type", None) or raw.get("model_type", "unknown"))
    if not isinstance(num_layers, int) or num_layers < 1:
        raise UnsupportedArchitectureError(model_type, "its config has no layer count (num_hidden_layers)")

    scoped_raw = raw
    for key in scope:
        scoped_raw = scoped_raw[key]
    mapped = getattr(text_config, "attribute_map", {}).get("num_hidden_layers")
    keys = ([mapped] if mapped else []) + list(LAYER_COUNT_KEYS)
    count_key = next((k for k in keys if scoped_raw.get(k) == num_layers), None)
    if count_key is None:
        raise UnsupportedArchitectureError(model_type, "cannot tell which config.json field holds the layer count")

    model = _build_on_meta(config, trust_remote_code=trust_remote_code)
    module_path = _find_stack(model, num_layers)
    prefix = _match_prefix(module_path, getattr(model, "base_model_prefix", ""), names, num_layers)

    per_layer, index_lists = layer_fields(text_config.to_dict(), num_layers)
    full = config.to_dict()
    return Architecture(
        model_type=model_type,
        class_name=type(model).__name__,
        num_layers=num_layers,
        layer_prefix=prefix,
        module_path=module_path,
        count_key=count_key,
        config_scope=scope,
        per_layer=per_layer,
        index_lists=index_lists,
        config=full,
    )


def stated_layer_count(raw: dict[str, Any]) -> tuple[str, int] | None:
    """The layer count key and value of a config.json that states its stack (see :data:`STATED_IN_CONFIG`).

    Args:
        raw: config.json as read by :func:`read_config`.

    Returns:
        ``(key, count)``, or None when only transformers' config class can tell: a model type not in
        :data:`STATED_IN_CONFIG`, remote code (``auto_map``), a nested text config, no single layer
        count, or a per-layer field the config class would derive that config.json lacks.

    Example:
        >>> stated_layer_count({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30})
        ('num_hidden_layers', 30)
        >>> stated_layer_count({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2}) is None
        True
    """
    derived = STATED_IN_CONFIG.get(raw.get("model_type"))  # type: ignore[arg-type]
    architectures = raw.get("architectures")
    if derived is None or raw.get("auto_map") or not (isinstance(architectures, list) and len(architectures) == 1):
        return None
    if not _CLASS_NAME.match(architectures[0]):  # not a model class name: transformers' path names the problem
        return None
    if any(isinstance(raw.get(key), dict) for key in NESTED_CONFIG_KEYS):
        return None
    counts = {key: raw[key] for key in LAYER_COUNT_KEYS if raw.get(key) is not None}
    if len(set(counts.values())) != 1:  # none, or keys that disagree: the config class decides
        return None
    key, count = next(iter(counts.items()))
    if not is_count(count) or not 1 <= count <= MAX_POSITIONS:
        return None
    for field in derived:
        value = raw.get(field)
        if not isinstance(value, list) or (field not in INDEX_LIST_FIELDS and len(value) != count):
            return None
    return key, int(count)


def stack_prefix(tensor_names: Iterable[str], num_layers: int) -> str | None:
    """The one tensor-name prefix ``P`` whose ``P.<i>.`` names cover layers ``0..num_layers-1`` alike.

    Args:
        tensor_names: the checkpoint's tensor names.
        num_layers: the layer count from the config.

    Returns:
        The prefix, or None unless exactly one prefix has exactly those layers, each with the same
        tensor names (identical blocks); an encoder-decoder or a checkpoint with layers missing is
        left to the transformers path, which names the problem.

    Example:
        >>> stack_prefix(["model.embed.weight", "model.layers.0.w", "model.layers.1.w", "lm_head.weight"], 2)
        'model.layers'
        >>> stack_prefix(["enc.0.w", "enc.1.w", "dec.0.w", "dec.1.w"], 2) is None
        True
    """
    layers: dict[str, dict[int, set[str]]] = {}
    for name in tensor_names:
        match = _LAYER_NAME.match(name)
        if match:
            layers.setdefault(match["prefix"], {}).setdefault(int(match["index"]), set()).add(match["rest"])
    matching = [
        prefix for prefix, by_index in layers.items()
        if set(by_index) == set(range(num_layers)) and all(by_index[i] == by_index[0] for i in by_index)
    ]
    return matching[0] if len(matching) == 1 else None


_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_LAYER_NAME = re.compile(r"^(?P<prefix>.+?)\.(?P<index>0|[1-9]\d*)\.(?P<rest>.+)$")


def detect_from_files(raw: dict[str, Any], tensor_names: Iterable[str]) -> Architecture | None:
    """The layer stack from config.json and the tensor names alone, without torch or transformers.

    Args:
        raw: config.json as read by :func:`read_config`.
        tensor_names: the checkpoint's tensor names.

    Returns:
        The :class:`Architecture` (with ``from_files=True``), or None when the files do not settle
        it (see :func:`stated_layer_count` and :func:`stack_prefix`); :func:`detect` then asks
        transformers.

    Example:
        >>> raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}
        >>> detect_from_files(raw, ["model.layers.0.w", "model.layers.1.w"]).layer_prefix
        'model.layers'
    """
    stated = stated_layer_count(raw)
    if stated is None:
        return None
    count_key, num_layers = stated
    prefix = stack_prefix(tensor_names, num_layers)
    if prefix is None:
        return None
    per_layer, index_lists = layer_fields(raw, num_layers)
    return Architecture(
        model_type=str(raw["model_type"]),
        class_name=str(raw["architectures"][0]),
        num_layers=num_layers,
        layer_prefix=prefix,
        module_path=prefix,
        count_key=count_key,
        config_scope=(),
        per_layer=per_layer,
        index_lists=index_lists,
        config=json.loads(json.dumps(raw)),
        from_files=True,
    )
