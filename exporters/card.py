"""The model card (``README.md``) of an output directory: written at surgery time, updated by validation and push.

The card is truthful by construction: every statement in it is derived from the plan, the source
and the files written, never typed by hand. Its YAML metadata carries ``base_model`` (the source's
Hub repo id, or the local path's name when no repo id is known), ``base_model_relation`` only where
one of the Hub's relations describes the change, ``library_name: transformers``, ``pipeline_tag``
where the model class says it, ``tags`` naming the operations plus ``layer-surgery``, and the
source's license. The body says what was done in one sentence, then gives the recipe, the layer
map, parameter counts before and after, the validation table (once validation ran) and how to
load the model.

Two sections are delimited by HTML comments so that later steps rewrite only their part:
validation (:func:`update_card_with_validation`) and loading (:func:`set_card_repo_id`, called by
the push once the repo id is known).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.checkpoint import has_tokenizer
from surgery.engine import _count, _human  # one formatting of counts and sizes for the summary and the card
from surgery.errors import CheckpointError, ModelCardError
from surgery.gguf_header import gguf_strings
from surgery.modeling_wide import shipped_code_line
from surgery.plan import RECIPE_FILENAME, format_ranges
from surgery.source import hub_endpoint

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from surgery.engine import SurgeryResult
    from surgery.source import Source

CARD_FILENAME = "README.md"
LOCAL_PLACEHOLDER = "path/to/this/directory"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_VALIDATION = ("<!-- layer-surgery:validation -->", "<!-- /layer-surgery:validation -->")
_LOAD = ("<!-- layer-surgery:load -->", "<!-- /layer-surgery:load -->")
_NOT_VALIDATED = "Not validated yet: no comparison with the source model has been run on this output."
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE_DIR = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")
_LICENSE_KEYS = ("license", "license_name", "license_link")


# -- what the card says about the source -------------------------------------------------------


def base_model_of(source: Source) -> str:
    """The card's ``base_model``: the source's Hub repo id when known, else the local path's name.

    Known repo ids: a Hub source, the embedded default model, a directory inside a Hugging Face
    cache (``models--ORG--NAME/snapshots/SHA``), and a GGUF file whose metadata names its source repo.

    Example:
        >>> from surgery.source import Source
        >>> base_model_of(Source("org/model", Path("/tmp/x"), repo_id="org/model"))
        'org/model'
        >>> base_model_of(Source("/data/my-model/", Path("/data/my-model")))
        'my-model'
    """
    if source.repo_id:
        return source.repo_id
    if source.name == "default":
        return DEFAULT_BASE_MODEL
    path = Path(source.name).expanduser()
    for part in (path, *path.parents):
        match = _HUB_CACHE_DIR.match(part.name)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    gguf = _gguf_file(source)
    if gguf is not None:
        meta = _gguf_metadata(gguf)
        url = str(meta.get("general.source.huggingface.repository") or meta.get("general.source.repo_url") or "")
        repo = url.removeprefix("https://huggingface.co/").strip("/")
        if _REPO_ID.match(repo):
            return repo
    return path.resolve().name if path.exists() else path.name


def _gguf_file(source: Source) -> Path | None:
    if source.name == "default":
        from surgery.source import default_model_path

        try:
            return default_model_path()
        except Exception:  # the embedded model is optional; the card then just lacks its metadata
            return None
    path = Path(source.name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """The ``general.*`` string fields of a GGUF header (empty when it cannot be read)."""
    stat = path.stat()
    return dict(_read_gguf_metadata(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_gguf_metadata(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    # The bounded header walk, not gguf.GGUFReader: that decodes the whole vocabulary first (6 s for SmolLM2).
    try:
        return tuple(gguf_strings(Path(path)).items())
    except CheckpointError:  # an unreadable file: the card just lacks these fields
        return ()


def license_of(source: Source) -> dict[str, str]:
    """The source's license fields (``license``, ``license_name``, ``license_link``), to carry over.

    Read from the source's own model card metadata, or from a GGUF file's ``general.license``.
    """
    readme = source.path / CARD_FILENAME
    if readme.is_file():
        try:
            meta = card_metadata(readme.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeError, ValueError):  # an unreadable source card: no license to carry
            meta = {}
        found = {k: str(meta[k]) for k in _LICENSE_KEYS if isinstance(meta.get(k), (str, int, float))}
        if found:
            return found
    gguf = _gguf_file(source)
    if gguf is not None:
        value = _gguf_metadata(gguf).get("general.license")
        if value:
            return {"license": value.strip().lower()}
    return {}


# -- building the card ---------------------------------------------------------------------------


def _sentence(result: SurgeryResult, base: str) -> str:
    """What was done, in one sentence."""
    plan = result.recipe.plan
    n, m = plan.num_source_layers, len(plan)
    applied = plan.source_sequence()
    changes = []
    dropped = sorted(set(range(n)) - set(applied))
    if dropped:
        changes.append(f"layer{'s' if len(dropped) > 1 else ''} {format_ranges(dropped)} removed")
    # repeats beyond a group's own loop (the loop is said with the group)
    once = [i for step in plan.layers for i in (step.layers if not isinstance(step, int) else (step,))]
    repeated = sorted(i for i, count in Counter(once).items() if count > 1)
    if repeated:
        changes.append(f"layer{'s' if len(repeated) > 1 else ''} {format_ranges(repeated)} repeated")
    if "layer-reordered" in plan.operations:
        changes.append("the layer order changed")
    for group in plan.groups:
        times = f", applied {group.loop} times in a row" if group.loop > 1 else ""
        shared = " (MLPs sharing one input: an approximation)" if group.mlp_input == "shared" else ""
        changes.append(f"layers {format_ranges(list(group.layers))} run in parallel on the same input "
                       f"with their outputs averaged{shared}{times}")
    if not changes:
        what = "its layers unchanged"
    elif len(changes) == 1:
        what = changes[0]
    else:
        what = "; ".join(changes[:-1]) + "; and " + changes[-1]
    dtype = result.recipe.options.dtype
    copied = f"copied, cast to {dtype}," if dtype else "copied unchanged"
    if plan.groups:
        depth = f"{n} layers → {m} layer applications in {len(plan.layers)} blocks"
        copied += " (a group's layers side by side in one wide block)"
    else:
        depth = f"{n} → {m} layers"
    return (f"This model is {base} with {what} ({depth}), rebuilt by layer-surgery: "
            f"no weights were trained, the source's tensors are {copied} and renamed.")


def _pipeline_tag(class_name: str) -> str | None:
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if class_name.endswith("ForMaskedLM"):
        return "fill-mask"
    if class_name.endswith("Model"):
        return "feature-extraction"
    return None


def _auto_class(class_name: str) -> str:
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "AutoModelForCausalLM"
    if class_name.endswith("ForMaskedLM"):
        return "AutoModelForMaskedLM"
    return "AutoModel"


def load_snippet(directory: Path, model_id: str) -> str:
    """The "how to load" block for the model in ``directory``, loaded as ``model_id``.

    Uses ``trust_remote_code=True`` when the config maps its classes to code in the repository
    (``auto_map``; wide-block models), and loads the tokenizer when tokenizer files are present.
    """
    config = json.loads((directory / "config.json").read_text())
    class_name = (config.get("architectures") or ["AutoModel"])[0]
    remote = bool(config.get("auto_map"))
    auto = _auto_class(class_name)
    extra = ", trust_remote_code=True" if remote else ""
    tokenizer = has_tokenizer(directory)
    lines = ["```python", f"from transformers import {auto}" + (", AutoTokenizer" if tokenizer else ""), ""]
    lines.append(f'model = {auto}.from_pretrained("{model_id}"{extra})')
    if tokenizer:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{model_id}"{extra})')
    lines.append("```")
    if remote:
        lines += ["", "This model's blocks are defined by code shipped in the repository (`auto_map` in `config.json`), "
                  "hence `trust_remote_code=True`: read that code before running it."]
    tested = shipped_code_line(config)
    if tested:
        lines += ["", tested]
    return "\n".join(lines)



def _section(markers: tuple[str, str], body: str) -> str:
    return f"{markers[0]}\n{body}\n{markers[1]}"


def build_card(directory: Path, result: SurgeryResult, source: Source) -> str:
    """The full card text (YAML metadata and Markdown body) for the output written in ``directory``.

    Args:
        directory: the (staging) output directory, already holding ``config.json`` and the recipe.
        result: what the engine wrote.
        source: the source the plan was applied to.

    Returns:
        The README.md text; it parses with ``huggingface_hub.ModelCard``.
    """
    plan = result.recipe.plan
    arch = result.architecture
    base = base_model_of(source)
    on_hub = bool(_REPO_ID.match(base))  # a path's name has no '/': only known repo ids match
    operations = list(plan.operations)
    licenses = license_of(source)
    metadata = card_metadata_fields(
        base_model=base,
        # The Hub's relations are adapter, merge, quantized and finetune; only a merge of layers
        # describes a layer rewrite, so dropping, repeating and reordering leave it unset.
        base_model_relation="merge" if "parallel-merged" in operations else None,
        library_name="transformers",
        pipeline_tag=_pipeline_tag(arch.class_name),
        tags=[*operations, "layer-surgery"],
        license=licenses.get("license"),
        license_name=licenses.get("license_name"),
        license_link=licenses.get("license_link"),
    )
    source_params = result.source_params
    base_text = f"[{base}]({hub_endpoint() or 'https://huggingface.co'}/{base})" if on_hub else f"`{base}`"
    if source.name == "default":
        base_text += " (the embedded Q4_1 GGUF, dequantized)"
        rebuild_source = ""
    else:
        if _gguf_file(source) is not None:
            base_text += " (a GGUF file, dequantized)"
        rebuild_source = f"{base} " if on_hub else "SOURCE "

    # Nothing here depends on where the output was written: one recipe gives one card, byte for byte.
    lines = [f"# {base}: {', '.join(operations) or 'layers unchanged'}", "", _sentence(result, base_text), ""]
    lines += [
        f"- **Source:** {base_text}, `{arch.class_name}` (model_type `{arch.model_type}`)",
        f"- **Operations:** {', '.join(operations) or 'none (layers unchanged)'}",
        f"- **Layers:** {arch.num_layers} → {len(plan)}",
        f"- **Parameters:** {_count(source_params)} → {result.output_params:,}",
        f"- **Weights:** {result.recipe.options.dtype or 'dtype as in the source'}, "
        f"{len(result.shards)} safetensors shard(s), {_human(result.total_bytes)}",
        "",
        "## Recipe",
        "",
        f"The plan and options, as `{RECIPE_FILENAME}` in this repository. Rebuild this model from its source with "
        f"`surgery apply {rebuild_source}OUT --recipe {RECIPE_FILENAME}`:",
        "",
        "```yaml",
        result.recipe.to_yaml().rstrip("\n"),
        "```",
        "",
        "## Layer map",
        "",
    ]
    types = arch.per_layer.get("layer_types")
    lines.append("| new layer | source layer |" + (" layer type |" if types else ""))
    lines.append("|---:|---:|" + ("---|" if types else ""))
    for new, step in plan.positions():
        if isinstance(step, int):
            lines.append(f"| {new} | {step} |" + (f" {types[step]} |" if types else ""))
        else:  # a parallel group: one wide block in the new model
            kinds = f" {', '.join(sorted({str(types[i]) for i in step.layers}))} |" if types else ""
            lines.append(f"| {new} | {format_ranges(list(step.layers))} in parallel (`{step}`) |" + kinds)
    lines += [
        "",
        "## Parameters",
        "",
        "| | layers | parameters |",
        "|---|---:|---:|",
        f"| source | {arch.num_layers} | {_count(source_params)} |",
        f"| this model | {len(plan)} | {result.output_params:,} |",
        "",
        "## Validation",
        "",
        _section(_VALIDATION, _NOT_VALIDATED),
        "",
        "## How to load",
        "",
        _section(_LOAD, "From the output directory (`surgery push` puts the Hub repo id here):\n\n"
                 + load_snippet(directory, LOCAL_PLACEHOLDER)),
        "",
        "Made with layer-surgery, which rewrites a model's layer stack by copying the source's tensors "
        "into a new checkpoint; the recipe above rebuilds it.",
        "",
    ]
    text = f"---\n{metadata_yaml(metadata)}\n---\n\n" + "\n".join(lines)
    try:  # the block reads back as what was meant (a bug otherwise, reported rather than uploaded)
        read_back = card_metadata(text)
    except ValueError as exc:
        raise ModelCardError(str(directory / CARD_FILENAME), f"does not parse as a model card ({exc})") from None
    if read_back != metadata:
        raise ModelCardError(str(directory / CARD_FILENAME), "its metadata does not read back as written")
    return text


# The order of ``huggingface_hub.ModelCardData``'s named fields: its ``to_yaml`` writes them in this order,
# then any other key in the order given.
_CARD_FIELD_ORDER = ("base_model", "datasets", "eval_results", "language", "library_name", "license", "license_name",
                     "license_link", "metrics", "model_name", "pipeline_tag", "tags")


def card_metadata_fields(**fields: Any) -> dict[str, Any]:
    """The metadata ``huggingface_hub.ModelCardData(**fields).to_dict()`` gives, for the plain fields
    a surgery card holds (no ``eval_results``): its field order, ``None`` dropped, tags de-duplicated
    in order; built without importing ``huggingface_hub`` (17 ms of every write). A test checks it
    against ``ModelCardData`` itself.

    Example:
        >>> card_metadata_fields(tags=["a", "b", "a"], library_name="transformers", license=None)
        {'library_name': 'transformers', 'tags': ['a', 'b']}
    """
    if "eval_results" in fields or "model-index" in fields:
        raise ValueError("eval results go through huggingface_hub.ModelCardData")
    tags = fields.get("tags")
    if tags is not None:
        fields["tags"] = list(dict.fromkeys([tags] if isinstance(tags, str) else tags))
    ordered = [*(key for key in _CARD_FIELD_ORDER if key in fields), *(key for key in fields if key not in _CARD_FIELD_ORDER)]
    return {key: fields[key] for key in ordered if fields[key] is not None}


def metadata_yaml(metadata: Mapping[str, Any]) -> str:
    """The YAML block of a card's metadata, dumped as ``ModelCardData.to_yaml`` dumps it."""
    import yaml

    return str(yaml.dump(dict(metadata), sort_keys=False, allow_unicode=True)).strip()


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically (a reader never sees half a card)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_card(directory: Path, result: SurgeryResult, source: Source) -> Path:
    """Write ``README.md`` into an output (staging) directory; called by the engine after the recipe.

    Args:
        directory: the directory being written, with ``config.json`` and the recipe already in it.
        result: what the engine wrote.
        source: the source model.

    Returns:
        The path of the card.

    Raises:
        ModelCardError: the generated card does not parse (a bug, reported rather than uploaded).

    Example:
        >>> write_card(staging, result, source)  # doctest: +SKIP
        PosixPath('.../README.md')
    """
    path = directory / CARD_FILENAME
    _write(path, build_card(directory, result, source))
    return path


# -- reading and validating ----------------------------------------------------------------------


# huggingface_hub's own pattern for the metadata block (huggingface_hub.repocard.REGEX_YAML_BLOCK).
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def card_metadata(text: str) -> dict[str, Any]:
    """A card's YAML metadata as ``huggingface_hub.repocard.metadata_load`` reads it (its pattern, then
    ``yaml.safe_load``), without importing ``huggingface_hub.repocard`` (0.13-0.15 s: a surgery on a
    source with a README.md paid it on every run). No metadata block, or an empty one: ``{}``.

    Raises:
        ValueError: the block is not valid YAML, or not a mapping.

    Example:
        >>> card_metadata("---\nlicense: apache-2.0\n---\n# m\n")
        {'license': 'apache-2.0'}
    """
    import yaml

    match = _YAML_BLOCK.search(text)  # an unclosed block: empty metadata, as ModelCard reads it
    try:
        data = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("repo card metadata block should be a dict")
    return data


def check_card_metadata(text: str, *, origin: str = CARD_FILENAME) -> None:
    """The checks of :func:`validate_card` on a card's text, as ``ModelCard`` parses it (its pattern,
    ``yaml.safe_load``, ``ModelCardData``) without importing ``huggingface_hub.repocard`` (0.13 s,
    paid by every surgery that writes a card).

    Raises:
        ModelCardError: no metadata block at the top, metadata that does not parse, or empty metadata.

    Example:
        >>> check_card_metadata("---\nlibrary_name: transformers\n---\n# m\n")
    """
    from huggingface_hub.repocard_data import ModelCardData

    if not text.startswith("---"):
        raise ModelCardError(origin, "has no YAML metadata block at the top")
    try:
        card_data = ModelCardData(**card_metadata(text))
    except Exception as exc:  # yaml.YAMLError, ValueError: any parse failure is a bad card
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelCardError(origin, f"does not parse as a model card ({first})") from None
    if not card_data.to_dict():
        raise ModelCardError(origin, "has an empty YAML metadata block")


def validate_card(text_or_path: str | Path, *, origin: str | None = None) -> ModelCard:
    """Parse a card with ``huggingface_hub.ModelCard`` and check it has YAML metadata.

    Args:
        text_or_path: the card text, or the path of a README.md.
        origin: the name used in errors (default: the path, or ``README.md``).

    Returns:
        The parsed :class:`huggingface_hub.ModelCard`.

    Raises:
        ModelCardError: the file is missing or unreadable, the metadata is not valid YAML or not a
            mapping, or it is empty.

    Example:
        >>> validate_card("---\\nlibrary_name: transformers\\n---\\n# m\\n").data.library_name
        'transformers'
    """
    from huggingface_hub import ModelCard

    if isinstance(text_or_path, Path):
        origin = origin or str(text_or_path)
        try:
            text = text_or_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelCardError(origin, "is missing", hint="surgery writes one into every output; re-run the surgery") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelCardError(origin, f"cannot be read ({exc})") from None
    else:
        text = text_or_path
    origin = origin or CARD_FILENAME
    check_card_metadata(text, origin=origin)  # the one set of checks and messages
    try:
        return ModelCard(text)
    except Exception as exc:  # what the light check cannot see (it parses as ModelCard does, so rare)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelCardError(origin, f"does not parse as a model card ({first})") from None


def _replace_section(text: str, markers: tuple[str, str], body: str, heading: str) -> str:
    start, end = text.find(markers[0]), text.find(markers[1])
    if start != -1 and end > start:
        return text[:start] + _section(markers, body) + text[end + len(markers[1]):]
    return text.rstrip("\n") + f"\n\n## {heading}\n\n{_section(markers, body)}\n"


def set_card_repo_id(directory: str | os.PathLike[str], repo_id: str) -> bool:
    """Point the card's loading snippet (and its ``model-index`` name) at ``repo_id`` (the push calls this before uploading).

    Returns:
        True when the card changed; False when there is no card or no config to derive it from.
    """
    directory = Path(directory)
    path = directory / CARD_FILENAME
    if not path.is_file() or not (directory / "config.json").is_file():
        return False
    text = path.read_text(encoding="utf-8")
    updated = _replace_section(text, _LOAD, load_snippet(directory, repo_id), "How to load")
    card = validate_card(updated, origin=str(path))
    data: Any = card.data  # a ModelCardData
    if data.eval_results and data.model_name != repo_id:  # the model-index names the published model
        data.model_name = repo_id
        updated = str(card)
    if updated == text:
        return False
    validate_card(updated, origin=str(path))
    _write(path, updated)
    return True


# -- validation results --------------------------------------------------------------------------

_METRICS = ("kl", "top1", "ppl_original", "ppl_new", "embedding_cosine")
_CAUSAL = ("kl", "top1", "ppl_original", "ppl_new")
METADATA_KEY = "layer_surgery"  # the card's YAML key holding the validation rows and the weights they measured
_ROW_KEYS = ("text", "tokens", *_METRICS, "hidden_cosine", "greedy_agreement", "bars", "passed")
# The metrics the model-index publishes (the source's perplexity is not a result of this model).
_MODEL_INDEX_METRICS = (
    ("kl", "kl_divergence", "KL(source || this model), nats/token"),
    ("top1", "top1_agreement", "top-1 agreement with the source"),
    ("ppl_new", "perplexity", "perplexity"),
    ("embedding_cosine", "cosine_similarity", "embedding cosine similarity with the source"),
)


def _number(value: Any, key: str, origin: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelCardError(origin, f"validation report field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _check_rows(report: Mapping[str, Any] | Sequence[Mapping[str, Any]], origin: str) -> list[dict[str, Any]]:
    """The report as a list of checked rows holding only the keys the card keeps."""
    rows = [report] if isinstance(report, Mapping) else list(report) if isinstance(report, Sequence) and not isinstance(report, str) else None
    if rows is None:
        raise ModelCardError(origin, f"a validation report must be a dict or a list of dicts, got {type(report).__name__}")
    if not rows:
        raise ModelCardError(origin, "the validation report is empty")
    checked = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ModelCardError(origin, f"a validation report must be a dict, got {type(row).__name__}")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ModelCardError(origin, "a validation report needs 'text': the name of the text it was measured on")
        values = {k: _number(row.get(k), k, origin) for k in _METRICS}
        if all(v is None for v in values.values()):
            raise ModelCardError(origin, f"the report for {text!r} has none of {', '.join(_METRICS)}")
        kl, top1 = values["kl"], values["top1"]
        if kl is not None and kl < 0:
            raise ModelCardError(origin, f"'kl' cannot be negative, got {kl}")
        if top1 is not None and not 0 <= top1 <= 1:
            raise ModelCardError(origin, f"'top1' is a fraction between 0 and 1, got {top1}")
        bars = row.get("bars")
        if bars is not None and not (isinstance(bars, list) and all(isinstance(b, Mapping) for b in bars)):
            raise ModelCardError(origin, f"'bars' of the report for {text!r} must be a list of dicts")
        passed = row.get("passed")
        if passed is not None and not isinstance(passed, bool):
            raise ModelCardError(origin, f"'passed' of the report for {text!r} must be true or false")
        kept = {k: row[k] for k in _ROW_KEYS if row.get(k) is not None}
        kept["text"] = " ".join(text.split())
        checked.append(kept)
    return checked


def _gate(row: Mapping[str, Any]) -> str:
    bars = row.get("bars") or []
    if not bars:
        return "—"
    parts = []
    for bar in bars:
        option = str(bar.get("option", "?")).replace("_", "-")
        verdict = "met" if bar.get("passed") else "**missed**"
        parts.append(f"{option} {bar.get('limit')}: {verdict}")
    return "; ".join(parts)


def validation_table(report: Mapping[str, Any] | Sequence[Mapping[str, Any]], origin: str = "report") -> str:
    """The Markdown table for one validation report or several (one row per text); see
    :func:`update_card_with_validation` for the expected shape.

    Columns that no row has are left out: a causal LM's table has KL, top-1 and perplexities, an
    encoder's the embedding cosine; a gate column appears once a row was measured against a gate.

    Raises:
        ModelCardError: a report of the wrong shape.
    """
    rows = _check_rows(report, origin)
    formats: dict[str, tuple[str, Any]] = {
        "kl": ("KL(source ‖ this) ↓", lambda v: f"{v:.4g}"),
        "top1": ("top-1 agreement ↑", lambda v: f"{v:.1%}"),
        "ppl_original": ("perplexity, source", lambda v: f"{v:.2f}"),
        "ppl_new": ("perplexity, this model", lambda v: f"{v:.2f}"),
        "embedding_cosine": ("embedding cosine ↑", lambda v: f"{v:.4f}"),
    }
    causal = any(row.get(k) is not None for row in rows for k in _CAUSAL)
    wanted = [*(_CAUSAL if causal else ()), *(("embedding_cosine",) if any("embedding_cosine" in r for r in rows) else ())]
    gates = any(row.get("bars") for row in rows)
    head = ["text", "tokens", *(formats[k][0] for k in wanted), *(["gate"] if gates else [])]
    align = ["---", "---:", *("---:" for _ in wanted), *(["---"] if gates else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        tokens = row.get("tokens")
        cells = [
            row["text"].replace("|", "\\|"),
            f"{tokens:,}" if isinstance(tokens, int) and not isinstance(tokens, bool) else "—",
            *("—" if row.get(k) is None else formats[k][1](float(row[k])) for k in wanted),
            *([_gate(row)] if gates else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _digest_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def output_identity(directory: str | os.PathLike[str]) -> dict[str, str | None]:
    """What identifies the model a validation measured: hashes of its weights and of its recipe.

    ``weights_sha256`` is the sha256 of the lines ``NAME SHA256`` of every ``*.safetensors`` file and
    the shard index in ``directory`` (regular files, sorted by name): any changed byte of any
    weight, and any shard added or removed, changes it.
    ``recipe_sha256`` is the sha256 of ``surgery-recipe.yaml`` (None when there is none).

    Args:
        directory: a model directory.

    Returns:
        ``{"weights_sha256": ..., "recipe_sha256": ...}``.

    Raises:
        CheckpointError: the directory holds no safetensors weights.

    Examples:
        >>> output_identity("out/smol-19")["weights_sha256"][:12]  # doctest: +SKIP
        '3f1c0a9e77b2'
    """
    import hashlib

    from surgery.checkpoint import INDEX_FILENAME

    directory = Path(directory)
    # Regular files only (a symlink or FIFO is never opened: the push skips them too).
    files = sorted(p for p in directory.glob("*.safetensors") if _regular(p))
    if not files:
        raise CheckpointError(str(directory), "holds no .safetensors weights")
    if _regular(directory / INDEX_FILENAME):
        files = sorted([*files, directory / INDEX_FILENAME])
    listing = "".join(f"{p.name} {_digest_file(p)}\n" for p in files)
    recipe = directory / RECIPE_FILENAME
    return {
        "weights_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "recipe_sha256": _digest_file(recipe) if _regular(recipe) else None,
    }


def _regular(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def validation_record(card: ModelCard) -> dict[str, Any] | None:
    """The card's ``layer_surgery`` metadata (the validation rows and the identity they measured), if any."""
    record = card.data.get(METADATA_KEY)
    return record if isinstance(record, dict) else None


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:64].strip("-") or "text"


def _eval_results(rows: Sequence[Mapping[str, Any]], pipeline_tag: str | None) -> list[Any]:
    """The rows as ``huggingface_hub.EvalResult``s: what the Hub shows as this model's evaluation results."""
    from huggingface_hub import EvalResult

    task = pipeline_tag or "text-generation"
    results = []
    for row in rows:
        for key, metric_type, metric_name in _MODEL_INDEX_METRICS:
            if row.get(key) is None:
                continue
            results.append(EvalResult(
                task_type=task, dataset_type=_slug(row["text"]), dataset_name=row["text"],
                metric_type=metric_type, metric_value=float(f"{float(row[key]):.6g}"), metric_name=metric_name,
            ))
    return results


def update_card_with_validation(
    out_dir: str | os.PathLike[str],
    report: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    identity: Mapping[str, str | None] | None = None,
    model_name: str | None = None,
) -> Path:
    """Record validation results in the output's card (``surgery validate`` and ``--validate`` call this).

    The expected ``report`` is a dict (or a list of dicts, one per evaluation text)::

        {
            "text": "wikitext-2-raw-v1 test, first 4,096 tokens",  # required: what it was measured on
            "tokens": 4096,          # optional: tokens scored
            "kl": 0.0421,            # mean KL(source || new) per token, in nats (>= 0)
            "top1": 0.912,           # fraction of positions whose top-1 token agrees (0..1)
            "ppl_original": 11.84,   # perplexity of the source model on the text
            "ppl_new": 13.07,        # perplexity of this model on the text
            "embedding_cosine": 0.99,  # encoders: mean-pooled embedding cosine with the source
            "bars": [{"option": "max_kl", "limit": 0.5, "value": 0.0421, "passed": True}],  # optional gates
            "passed": True,          # optional: every gate met
        }

    At least one of ``kl``, ``top1``, ``ppl_original``, ``ppl_new``, ``embedding_cosine`` must be
    present; other keys are ignored. A row replaces the card's earlier row for the same text;
    rows for other texts stay, unless they were measured on other weights or another recipe
    (``identity``), which drops them. The card's YAML metadata gets the rows and the identity under
    ``layer_surgery`` (what ``surgery push`` checks) and the results as the Hub's ``model-index``
    (its evaluation results).

    Args:
        out_dir: an output directory written by surgery (it holds ``README.md``).
        report: the validation results, as above.
        identity: what the measured model was (:func:`output_identity`); default: computed now.
        model_name: the ``model-index`` name (default: the card's, else the directory's name).

    Returns:
        The path of the updated card.

    Raises:
        ModelCardError: no card in ``out_dir``, or a report of the wrong shape.
        CheckpointError: ``out_dir`` holds no safetensors weights (with no ``identity`` given).

    Example:
        >>> update_card_with_validation("out/smol-19", {"text": "wikitext-2 test", "kl": 0.04,
        ...     "top1": 0.91, "ppl_original": 11.8, "ppl_new": 13.1})  # doctest: +SKIP
        PosixPath('out/smol-19/README.md')
    """
    directory = Path(out_dir)
    path = directory / CARD_FILENAME
    card = validate_card(path)
    new_rows = _check_rows(report, str(path))
    measured = dict(identity) if identity is not None else output_identity(directory)
    old = validation_record(card) or {}
    same_model = {k: old.get(k) for k in ("weights_sha256", "recipe_sha256")} == {
        k: measured.get(k) for k in ("weights_sha256", "recipe_sha256")}
    recorded = old.get("validation")
    old_rows: list[Any] = recorded if same_model and isinstance(recorded, list) else []
    by_text = {row["text"]: row for row in new_rows}
    rows = [by_text.pop(row.get("text"), row) for row in old_rows if isinstance(row, dict)]
    rows += [row for row in new_rows if row["text"] in by_text]
    table = validation_table(rows, origin=str(path))

    data: Any = card.data  # a ModelCardData
    data[METADATA_KEY] = {
        "weights_sha256": measured.get("weights_sha256"), "recipe_sha256": measured.get("recipe_sha256"),
        "validation": rows,
    }
    data.model_name = model_name or data.model_name or directory.resolve().name
    data.eval_results = _eval_results(rows, data.pipeline_tag)
    weights = str(measured.get("weights_sha256") or "")
    body = ("Measured by comparing this model with its source on the same tokens (`surgery validate`):\n\n" + table
            + f"\n\nThese figures describe the weights with sha256 `{weights[:16]}…` over the safetensors files "
            "(`layer_surgery.weights_sha256` in the metadata, with the recipe's hash); `surgery push` refuses "
            "to publish other weights under this table.")
    card.text = _replace_section(card.text, _VALIDATION, body, "Validation")
    updated = str(card)
    validate_card(updated, origin=str(path))
    _write(path, updated)
    return path


def check_validated(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Refuse to publish an output whose card records no validation, a missed gate, or other weights.

    Args:
        directory: the output directory about to be pushed.

    Returns:
        The card's ``layer_surgery`` record.

    Raises:
        UnvalidatedOutputError: no validation in the card, a missed gate, or the recipe or the
            weights changed since the validation the card records.
        ModelCardError: no card, or one that does not parse.

    Examples:
        >>> check_validated("out/smol-19")["validation"][0]["text"]  # doctest: +SKIP
        'Hamlet, Prince of Denmark (William Shakespeare), plain text'
    """
    from surgery.errors import UnvalidatedOutputError

    directory = Path(directory)
    card = validate_card(directory / CARD_FILENAME)
    record = validation_record(card)
    rows = record.get("validation") if record else None
    if not record or not isinstance(rows, list) or not rows:
        raise UnvalidatedOutputError(str(directory), "its card records no validation")
    missed = [str(row.get("text")) for row in rows if isinstance(row, dict) and row.get("passed") is False]
    if missed:
        raise UnvalidatedOutputError(str(directory), f"its card records a missed gate on {', '.join(missed)}")
    now = output_identity(directory)
    if now["recipe_sha256"] != record.get("recipe_sha256"):
        raise UnvalidatedOutputError(str(directory), "its recipe changed after the validation its card records")
    if now["weights_sha256"] != record.get("weights_sha256"):
        raise UnvalidatedOutputError(str(directory), "its weights changed after the validation its card records")
    return record
