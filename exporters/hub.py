"""Push an output directory to the Hugging Face Hub, with its model card, in one commit.

Everything goes through ``huggingface_hub``: ``create_repo(exist_ok=True)`` then ``create_commit``
with one ``CommitOperationAdd`` per file of :func:`upload_files` (never ``upload_folder``, which walks
the directory itself and follows symlinks).
The token comes from ``token=``/``--token``, else ``HF_TOKEN``, else the stored login
(``hf auth login``); it is only ever handed to ``huggingface_hub`` and never printed, logged or
written. ``HF_ENDPOINT`` is read at call time, so a private Hub deployment works even when the
variable is set after ``huggingface_hub`` was imported.

Large files go as the client sends them (LFS, or Xet when ``hf_xet`` is installed); the Hub is
asked which objects it already holds, so an interrupted push run again sends only what is
missing. The commit is made once, after every file arrived: a failed push leaves no partial commit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from exporters.card import CARD_FILENAME, check_validated, set_card_repo_id, validate_card
from surgery.errors import (
    HubAuthError,
    HubPushError,
    HubRevisionError,
    MissingTokenError,
    ModelCardError,
    NotAModelDirectoryError,
    RejectedTokenError,
    RepoIdError,
)
from surgery.plan import RECIPE_FILENAME, Recipe
from surgery.redact import redact
from surgery.source import hub_endpoint, safe_files
from surgery.version import __version__

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitInfo, ModelInfo

logger = logging.getLogger(__name__)


def check_repo_id(repo_id: str) -> str:
    """Check a repo id the way the Hub does (``NAME`` or ``NAMESPACE/NAME``).

    Returns:
        ``repo_id`` unchanged.

    Raises:
        RepoIdError: empty, more than one ``/``, characters the Hub refuses, ``--``/``..``, or too long.

    Example:
        >>> check_repo_id("my-org/smol-19")
        'my-org/smol-19'
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise RepoIdError(str(repo_id), "it is empty")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise RepoIdError(repo_id, str(exc).split(". ")[0].split(":")[0].strip()) from None
    return repo_id


@dataclass(frozen=True)
class PushResult:
    """What a push sent (or, on a dry run, would send).

    Attributes:
        repo_id: the full ``namespace/name`` (known after the repo is created; as given on a dry run).
        revision: the branch pushed to.
        files: ``(path in repo, bytes)`` of every file, in upload order.
        private: whether a private repository was asked for.
        dry_run: True when nothing was sent.
        url: the repository's URL (None on a dry run).
        commit: the commit id (None on a dry run; the current head when nothing changed).
        commit_url: the commit's URL (None on a dry run).
        changed: False when the Hub already held exactly these files (no new commit was made).
    """

    repo_id: str
    revision: str
    files: list[tuple[str, int]]
    private: bool
    dry_run: bool
    url: str | None = None
    commit: str | None = None
    commit_url: str | None = field(default=None)
    changed: bool = True

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def summary(self) -> str:
        """What the CLI prints."""
        from surgery.engine import _human

        where = f"{self.repo_id} (branch {self.revision}{', private' if self.private else ''})"
        what = f"{len(self.files)} file(s), {_human(self.total_bytes)}"
        if self.dry_run:
            lines = [f"would push {what} to {where}"]
        elif self.changed:
            lines = [f"pushed {what} to {where}"]
        else:
            lines = [f"{where} already holds these {what}: nothing sent, no new commit"]
        lines += [f"  {name}  {_human(size)}" for name, size in self.files]
        if not self.dry_run:
            lines.append(f"commit {self.commit}: {self.commit_url or self.url}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``surgery push --json``."""
        return {
            "repo_id": self.repo_id, "revision": self.revision, "private": self.private, "dry_run": self.dry_run,
            "url": self.url, "commit": self.commit, "commit_url": self.commit_url, "changed": self.changed,
            "total_bytes": self.total_bytes, "files": [{"file": n, "bytes": b} for n, b in self.files],
        }


def upload_files(out: Path) -> list[tuple[str, int]]:
    """The files a push sends from ``out``, with sizes: exactly these are uploaded, and listed by ``--dry-run``.

    The same rule as the files copied from a model directory (:func:`surgery.source.safe_files`):
    regular files inside ``out``, hidden ones left out; a symlink leading outside it (to
    ``~/.ssh/id_rsa``, say), a symlinked directory, a FIFO, socket or device is skipped with a
    ``surgery: warning: skipped ...`` line and never opened. ``huggingface_hub``'s default ignore
    patterns (``.git``, ``.cache/huggingface``) apply on top.
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    found = {p.relative_to(out).as_posix(): p for p in safe_files(out)}
    kept = filter_repo_objects(found, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return [(name, found[name].stat().st_size) for name in kept]


def _check_sent_files(out: Path, files: list[tuple[str, int]]) -> None:
    """The card and config are read before the push: refuse them when they are not among the files
    sent (a symlink leading out, a FIFO), so nothing outside ``out`` is read and nothing blocks."""
    names = {name for name, _ in files}
    if CARD_FILENAME not in names and os.path.lexists(out / CARD_FILENAME):
        raise ModelCardError(str(out / CARD_FILENAME), "is not a regular file inside the directory")
    if "config.json" not in names:
        raise NotAModelDirectoryError(str(out), "its config.json is not a regular file inside it")


def _check_model_dir(out: Path) -> None:
    if not out.exists():
        raise NotAModelDirectoryError(str(out), "it does not exist")
    if not out.is_dir():
        raise NotAModelDirectoryError(str(out), "it is a file")
    if not (out / "config.json").is_file():
        raise NotAModelDirectoryError(str(out), "it has no config.json")
    if not any(out.glob("*.safetensors")):
        raise NotAModelDirectoryError(str(out), "it has no .safetensors weights")


def _commit_message(out: Path, names: set[str]) -> str:
    try:
        if RECIPE_FILENAME not in names:  # skipped as unsafe (or absent): never read
            raise FileNotFoundError(RECIPE_FILENAME)
        recipe = Recipe.load(out / RECIPE_FILENAME)
    except Exception:  # no recipe (or an unreadable one): a generic message; the card still says it all
        return "Upload model written by layer-surgery"
    ops = ", ".join(recipe.plan.operations) or "layers unchanged"
    return f"layer-surgery: {ops}, {recipe.plan.num_source_layers} -> {len(recipe.plan)} layers ({recipe.plan})"


def _redact(text: str, token: str | None) -> str:
    text = " ".join(str(text).split())
    return redact(text.replace(token, "***") if token else text, [token])


@contextmanager
def _progress(quiet: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if quiet and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()


def _translate(exc: BaseException, repo_id: str, revision: str, token: str | None, endpoint: str | None) -> Exception:
    """A huggingface_hub or network failure as one of our errors; the token never appears in it."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return HubRevisionError(repo_id, revision)
    if isinstance(exc, HFValidationError):
        return RepoIdError(repo_id, _redact(str(exc), token))
    if isinstance(exc, OfflineModeIsEnabled):
        return HubPushError(repo_id, "HF_HUB_OFFLINE is set, so huggingface_hub sends nothing")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        server = getattr(exc, "server_message", None) or str(exc).strip().splitlines()[0]
        server = _redact(server, token)
        if status == 401:
            return RejectedTokenError(repo_id, 401, f"the Hub rejected the token (401: {server})")
        if status == 403:
            return RejectedTokenError(repo_id, 403, f"the token may not write to this repository (403: {server})")
        if isinstance(exc, RepositoryNotFoundError):
            return HubPushError(repo_id, f"the repository is not found or not accessible with this token ({status})")
        return HubPushError(repo_id, f"the Hub answered {status}: {server}")
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        return ModelCardError(CARD_FILENAME, f"refused by the Hub ({_redact(str(exc), token)})")
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, RuntimeError) and cause is not None:  # "Error while uploading 'x' to the Hub." + why
        inner = _translate(cause, repo_id, revision, token, endpoint)
        reason = inner.reason if isinstance(inner, HubPushError) else _redact(str(cause), token)
        return HubPushError(repo_id, f"{_redact(str(exc), token)} ({reason})")
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or type(exc).__module__.startswith("httpx"):
        where = endpoint or "huggingface.co"
        return HubPushError(repo_id, f"the Hub at {where} could not be reached ({type(exc).__name__}: {_redact(str(exc), token)})")
    return HubPushError(repo_id, _redact(f"{type(exc).__name__}: {exc}", token))


def _require_revision(api: HfApi, repo_id: str, branch: str, *, missing_repo_ok: bool = True) -> ModelInfo:
    """The repository's info at ``branch``; a missing branch (or, before creating, repo) is an error."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return api.model_info(repo_id, revision=branch)
    except RevisionNotFoundError:
        raise HubRevisionError(repo_id, branch) from None
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if missing_repo_ok or status != 404:
            raise
        raise HubRevisionError(repo_id, branch) from None


def push(
    out: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    allow_unvalidated: bool = False,
) -> PushResult:
    """Upload an output directory, with its model card, to a Hub model repository in one commit.

    The repository is created when missing (``create_repo(exist_ok=True)``), the card is checked
    with ``huggingface_hub.ModelCard`` and its loading snippet pointed at the repo before anything
    is sent, then ``create_commit`` uploads exactly the files of :func:`upload_files` (files
    skipped there, such as symlinks leading outside ``out`` or FIFOs, are never read). Running the
    same push again after an interruption sends only the files the Hub does not have yet; pushing
    unchanged files makes no new commit.

    Only a validated output is published: its card must record a validation (``surgery validate``
    or ``--validate``) that met its gates, made on the weights and recipe ``out`` holds now
    (:func:`exporters.card.check_validated`); ``allow_unvalidated`` publishes it anyway.

    Args:
        out: a model directory written by surgery (``config.json``, safetensors, ``README.md``).
        repo_id: ``NAME`` (in the token owner's namespace) or ``NAMESPACE/NAME``.
        private: create the repository private; an existing public repository is refused.
        revision: the branch to push to (default ``main``); it must exist.
        commit_message: the commit title (default: the operations and the plan).
        token: a Hugging Face token; default ``HF_TOKEN``, then the stored login.
        dry_run: list the files and sizes that would be uploaded; send nothing, need no token.
        quiet: no progress bars.
        allow_unvalidated: publish even when the card records no validation, a missed gate, or
            other weights or another recipe than ``out`` holds.

    Returns:
        The :class:`PushResult`.

    Raises:
        RepoIdError: ``repo_id`` is not a valid Hub repo id.
        NotAModelDirectoryError: ``out`` is not a model directory.
        ModelCardError: ``out`` has no card, or one that does not parse (or the Hub refuses it).
        UnvalidatedOutputError: the card records no validation, a missed gate, or other weights or
            recipe (checked on a dry run too; ``allow_unvalidated`` skips it).
        MissingTokenError: no token anywhere.
        RejectedTokenError: the Hub refused the token (401), or it may not write there (403).
        HubRevisionError: ``revision`` does not exist in the repository.
        HubAuthError: ``private`` was asked but the existing repository is public.
        HubPushError: the network or the Hub stopped the push (nothing committed; run it again).

    Example:
        >>> import surgery
        >>> surgery.push("out/smol-19", "my-org/smol-19", private=True)  # doctest: +SKIP
        PushResult(repo_id='my-org/smol-19', revision='main', ...)
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    check_repo_id(repo_id)
    out = Path(out)
    _check_model_dir(out)
    files = upload_files(out)  # warns once about each file skipped
    _check_sent_files(out, files)
    validate_card(out / CARD_FILENAME)
    if not allow_unvalidated:
        check_validated(out)
    branch = revision or "main"
    if dry_run:
        return PushResult(repo_id=repo_id, revision=branch, files=files, private=private, dry_run=True)

    token = token or get_token()
    if not token:
        raise MissingTokenError(repo_id, "pushing to a private repository" if private else "pushing")
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token, library_name="layer-surgery", library_version=__version__)
    full_id = repo_id
    try:
        with _progress(quiet):
            if branch != "main" and "/" in repo_id:
                _require_revision(api, repo_id, branch, missing_repo_ok=False)  # before anything is created
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            full_id = url.repo_id or repo_id
            info = _require_revision(api, full_id, branch)
            if private and not info.private:
                raise HubAuthError(full_id, "exists and is public, and a private push was asked",
                                   hint="push to a new repo id, or make the repository private on the Hub first")
            set_card_repo_id(out, full_id)
            validate_card(out / CARD_FILENAME)
            files = [(name, (out / name).stat().st_size) for name, _ in files]  # the card's new size
            logger.info("pushing %d files to %s (branch %s)", len(files), full_id, branch)
            # Exactly the checked files, one commit (upload_folder would walk OUT again, following symlinks).
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=out / name) for name, _ in files]
            commit = cast("CommitInfo", api.create_commit(
                repo_id=full_id, operations=operations, revision=revision,
                commit_message=commit_message or _commit_message(out, {name for name, _ in files}),
            ))
    except (HubAuthError, HubRevisionError, ModelCardError):
        raise
    except Exception as exc:  # every client/network failure becomes one line without the token
        raise _translate(exc, full_id, branch, token, endpoint) from None
    return PushResult(
        repo_id=full_id, revision=branch, files=files, private=private, dry_run=False,
        url=str(url), commit=commit.oid, commit_url=commit.commit_url, changed=commit.oid != info.sha,
    )
