"""A small local stand-in for the Hugging Face Hub HTTP API, for offline tests of the real client.

It is a test double for the network only: the client under test is the real ``huggingface_hub``,
pointed here with ``HF_ENDPOINT``. It implements the endpoints that client calls for

* auth: ``GET /api/whoami-v2``; tokens are ``Authorization: Bearer ...`` and map to a user with
  ``read`` or ``write`` rights (unknown token: 401; writing into another namespace: 403);
* repos: ``POST /api/repos/create`` (the first commit holds ``.gitattributes``, as on the Hub),
  ``GET /api/models/{repo}[/revision/{rev}]``, ``GET /api/models/{repo}/tree/{rev}[/{path}]``,
  ``POST /api/models/{repo}/branch/{name}``, ``POST /api/validate-yaml``;
* upload: ``POST /api/models/{repo}/preupload/{rev}`` (regular or LFS, and the oid already there),
  the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` (objects already stored get no
  upload action, so an interrupted push resumes), single PUT and multipart uploads (parts plus a
  completion POST) with sha256 checks, ``.../objects/verify``, and the ndjson
  ``POST /api/models/{repo}/commit/{rev}`` applied only when the whole request is valid (one
  commit per push, nothing partial);
* download: ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit`` and
  byte ``Range`` support.

Every request is logged as ``(method, path, range header)`` in :attr:`FakeHub.requests`, so tests
can count what the client asked for. :attr:`FakeHub.fail_lfs_uploads_after` makes the server
refuse LFS uploads after that many have arrived, which interrupts a push half way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".onnx_data")
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    """One file of a commit: regular content (by git oid) or an LFS object (by sha256)."""

    size: int
    oid: str  # git blob oid for regular files, sha256 for LFS files
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)  # commit oid -> tree


class HubError(Exception):
    """An HTTP error answer, with the Hub's ``X-Error-Code`` when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.commit = commit


class FakeHub:
    """The server state plus the HTTP server that serves it (start with :meth:`start`).

    Attributes:
        tokens: token -> (user, role), role ``read`` or ``write``.
        orgs: user -> organisations the user may write into.
        requests: every request as ``(method, path, range header or None)``.
        lfs_uploads: sha256 of every LFS object whose upload completed.
        fail_lfs_uploads_after: refuse LFS uploads (HTTP 400) once ``lfs_uploads`` holds this many
            (count from the last :meth:`reset_log`): interrupts a push half way.
        multipart_threshold: LFS objects at least this large are uploaded in parts of ``part_size``.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="fake-hub-"))
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.tokens: dict[str, tuple[str, str]] = {}
        self.orgs: dict[str, set[str]] = {}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git oid -> content of regular files
        self.lfs_sizes: dict[tuple[str, str], int] = {}  # (repo, sha256) -> size: LFS objects are per repo
        self.requests: list[tuple[str, str, str | None]] = []
        self.lfs_uploads: list[str] = []
        self.fail_lfs_uploads_after: int | None = None
        self.multipart_threshold = 32 * 1024 * 1024
        self.part_size = 16 * 1024 * 1024
        self._parts: dict[tuple[str, str, int], bytes] = {}
        self._counter = 0
        self._nonce = uuid.uuid4().hex  # commit ids differ between servers, as they do on the Hub
        self.server: ThreadingHTTPServer | None = None
        self._url = ""
        self.stopped = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._url, "call start() first"
        return self._url

    def start(self) -> FakeHub:
        """Listen on 127.0.0.1, on a free port, in a daemon thread."""
        hub = self

        class Handler(_Handler):
            state = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self._url = f"http://{host!s}:{port}"
        self.stopped = False
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; connections kept alive by a client are closed at their next request."""
        self.stopped = True
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def reset_log(self) -> None:
        """Forget the request and upload logs and any injected failure."""
        with self.lock:
            self.requests.clear()
            self.lfs_uploads.clear()
            self.fail_lfs_uploads_after = None

    # -- helpers for tests -----------------------------------------------------------------------

    def add_token(self, token: str, user: str, role: str = "write", orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = (user, role)
        self.orgs.setdefault(user, set()).update(orgs)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Entry]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)])

    def content(self, entry: Entry) -> bytes:
        return (self.root / "lfs" / entry.oid).read_bytes() if entry.lfs else self.blobs[entry.oid]

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    # -- state changes (called with the lock held) -----------------------------------------------

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], message: str) -> str:
        self._counter += 1
        seed = json.dumps([self._nonce, repo.repo_id, parent, message, self._counter, sorted((p, e.oid) for p, e in tree.items())])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = tree
        return oid

    def _store_regular(self, data: bytes) -> Entry:
        oid = git_blob_oid(data)
        self.blobs[oid] = data
        return Entry(size=len(data), oid=oid, lfs=False)

    def _store_lfs(self, repo_id: str, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        path = self.root / "lfs" / oid
        partial = path.with_suffix(f".{threading.get_ident()}.partial")
        partial.write_bytes(data)
        partial.replace(path)
        self.lfs_sizes[(repo_id, oid)] = len(data)
        self.lfs_uploads.append(oid)


def _lfs_mode(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE or b"\0" in sample


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub  # set on the per-server subclass
    _read: bytes | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests read FakeHub.requests instead

    # -- plumbing --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _body(self) -> bytes:
        """The request body (read once: chunked or by Content-Length)."""
        if self._read is not None:
            return self._read
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            data = b"".join(chunks)
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._read = data
        return data

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except ValueError:
            raise HubError(400, "request body is not JSON") from None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        """Answer; ``length`` is the Content-Length a HEAD reports for the body a GET would send."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _dispatch(self, method: str) -> None:
        self._read = None
        if self.state.stopped:  # a kept-alive connection to a stopped server: drop it, like a dead host
            self.close_connection = True
            return
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        hub = self.state
        with hub.lock:
            hub.requests.append((method, path, self.headers.get("Range")))
        try:
            for verb, pattern, handler in _ROUTES:
                match = re.fullmatch(pattern, path)
                if match is not None and (verb == method or (verb, method) == ("GET", "HEAD")):
                    handler(self, query=query, **{k: unquote(v) if v else v for k, v in match.groupdict().items()})
                    return
            raise HubError(404, f"no route for {method} {path}")
        except HubError as exc:
            headers = {"X-Error-Message": str(exc)}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            if exc.commit:
                headers["X-Repo-Commit"] = exc.commit
            if method in ("POST", "PUT"):
                self._body()  # drain, so the connection stays usable
            self._send_json(exc.status, {"error": str(exc)}, headers)

    # -- auth ------------------------------------------------------------------------------------

    def _user(self, required: bool = False) -> tuple[str, str] | None:
        header = self.headers.get("Authorization") or ""
        if not header:
            if required:
                raise HubError(401, "You must be authenticated to do this")
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.state.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        allowed = user is not None and (namespace == user[0] or namespace in self.state.orgs.get(user[0], set()))
        if repo is None or (repo.private and not allowed):
            raise HubError(404 if user else 401, "Repository not found", code="RepoNotFound")
        if write and not (allowed and user is not None and user[1] == "write"):
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    # -- endpoints -------------------------------------------------------------------------------

    def _whoami(self, query: dict[str, list[str]]) -> None:
        user = self._user(required=True)
        assert user is not None
        orgs = [{"name": org} for org in sorted(self.state.orgs.get(user[0], set()))]
        self._send_json(200, {"type": "user", "name": user[0], "orgs": orgs,
                              "auth": {"type": "access_token", "accessToken": {"role": user[1]}}})

    def _create_repo(self, query: dict[str, list[str]]) -> None:
        user = self._user(required=True)
        assert user is not None
        body = self._json_body() or {}
        name, org = body.get("name"), body.get("organization") or user[0]
        if body.get("type") not in (None, "model"):
            raise HubError(400, "this fake Hub holds model repositories only")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise HubError(400, "invalid repository name")
        if user[1] != "write" or (org != user[0] and org not in self.state.orgs.get(user[0], set())):
            raise HubError(403, "You don't have the rights to create a repository in this namespace")
        repo_id = f"{org}/{name}"
        hub = self.state
        with hub.lock:
            if repo_id in hub.repos:  # the Hub's 409 still names the repo: the client reads its url
                self._send_json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                {"X-Error-Message": "You already created this model repo"})
                return
            repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            tree = {".gitattributes": hub._store_regular(GITATTRIBUTES)}
            repo.branches["main"] = hub._new_commit(repo, None, tree, "initial commit")
            hub.repos[repo_id] = repo
        self._send_json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, query: dict[str, list[str]]) -> None:
        content = (self._json_body() or {}).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, flags=re.DOTALL)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            self._send_json(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
            return
        if data is not None and not isinstance(data, dict):
            self._send_json(400, {"errors": [{"message": "metadata must be a mapping"}]})
            return
        self._send_json(200, {"errors": [], "warnings": []})

    def _model_info(self, query: dict[str, list[str]], repo: str, rev: str | None = None) -> None:
        with self.state.lock:
            found = self._repo(repo)
            commit = self._commit_of(found, rev or "main")
            tree = found.commits[commit]
        siblings = [{"rfilename": p} for p in sorted(tree)]
        self._send_json(200, {"id": repo, "modelId": repo, "sha": commit, "private": found.private,
                              "siblings": siblings, "tags": []})

    def _tree(self, query: dict[str, list[str]], repo: str, rev: str, path: str | None = None) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with self.state.lock:
            found = self._repo(repo)
            tree = found.commits[self._commit_of(found, rev)]
        prefix = f"{path.strip('/')}/" if path else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for file_path in sorted(tree):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if len(parts) > 1 and not recursive:
                continue
            entry = tree[file_path]
            item: dict[str, Any] = {"type": "file", "path": file_path, "size": entry.size}
            if entry.lfs:
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry.oid}\nsize {entry.size}\n"
                item["oid"] = git_blob_oid(pointer.encode())
                item["lfs"] = {"oid": entry.oid, "size": entry.size, "pointerSize": len(pointer)}
            else:
                item["oid"] = entry.oid
            entries.append(item)
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist", code="EntryNotFound")
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        self._send_json(200, entries)

    def _create_branch(self, query: dict[str, list[str]], repo: str, branch: str) -> None:
        body = self._json_body() or {}
        hub = self.state
        with hub.lock:
            found = self._repo(repo, write=True)
            if branch in found.branches:
                raise HubError(409, f"branch {branch} already exists")
            found.branches[branch] = self._commit_of(found, body.get("startingPoint") or "main")
        self._send_json(200, {})

    def _preupload(self, query: dict[str, list[str]], repo: str, rev: str) -> None:
        body = self._json_body() or {}
        with self.state.lock:
            found = self._repo(repo, write=True)
            tree = found.commits[self._commit_of(found, rev)]
        files = []
        for item in body.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            existing = tree.get(item["path"])
            files.append({
                "path": item["path"],
                "uploadMode": "lfs" if _lfs_mode(item["path"], int(item.get("size", 0)), sample) else "regular",
                "shouldIgnore": False,
                "oid": existing.oid if existing else None,
            })
        self._send_json(200, {"files": files, "commitOid": self._commit_of(found, rev)})

    def _lfs_batch(self, query: dict[str, list[str]], repo: str) -> None:
        body = self._json_body() or {}
        hub = self.state
        with hub.lock:
            found = self._repo(repo, write=body.get("operation") == "upload")
            if body.get("operation") == "upload" and "ref" in body:
                self._commit_of(found, body["ref"]["name"])
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if hub.lfs_sizes.get((repo, oid)) == size:
                objects.append({"oid": oid, "size": size})  # already stored: nothing to send
                continue
            verify = {"href": f"{hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}}
            if size >= hub.multipart_threshold:
                count = -(-size // hub.part_size)
                header = {"chunk_size": str(hub.part_size)}
                header.update({f"{n:05d}": f"{hub.url}/lfs-upload/{repo}/{oid}/part/{n}" for n in range(1, count + 1)})
                upload = {"href": f"{hub.url}/lfs-upload/{repo}/{oid}/complete", "header": header}
            else:
                upload = {"href": f"{hub.url}/lfs-upload/{repo}/{oid}", "header": {}}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": verify}})
        self._send_json(200, {"transfer": "basic", "objects": objects})

    def _check_budget(self) -> None:
        hub = self.state
        if hub.fail_lfs_uploads_after is not None and len(hub.lfs_uploads) >= hub.fail_lfs_uploads_after:
            raise HubError(400, "upload refused: the connection was interrupted (simulated)")

    def _lfs_put(self, query: dict[str, list[str]], repo: str, oid: str) -> None:
        data = self._body()
        hub = self.state
        with hub.lock:
            self._check_budget()
            hub._store_lfs(repo, oid, data)
        self._send(200, b"", content_type="text/plain")

    def _lfs_put_part(self, query: dict[str, list[str]], repo: str, oid: str, number: str) -> None:
        data = self._body()
        hub = self.state
        with hub.lock:
            self._check_budget()
            hub._parts[(repo, oid, int(number))] = data
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, content_type="text/plain")

    def _lfs_complete(self, query: dict[str, list[str]], repo: str, oid: str) -> None:
        body = self._json_body() or {}
        hub = self.state
        with hub.lock:
            self._check_budget()
            numbers = [int(p["partNumber"]) for p in body.get("parts", [])]
            try:
                chunks = [hub._parts[(repo, oid, n)] for n in numbers]
            except KeyError:
                raise HubError(400, "a part was never uploaded") from None
            for part, chunk in zip(body["parts"], chunks, strict=True):
                if part["etag"].strip('"') != hashlib.md5(chunk).hexdigest():
                    raise HubError(400, f"etag mismatch for part {part['partNumber']}")
            hub._store_lfs(repo, oid, b"".join(chunks))
            for n in numbers:
                hub._parts.pop((repo, oid, n), None)
        self._send_json(200, {})

    def _lfs_verify(self, query: dict[str, list[str]], repo: str) -> None:
        body = self._json_body() or {}
        if self.state.lfs_sizes.get((repo, str(body.get("oid")))) != body.get("size"):
            raise HubError(404, "object not stored")
        self._send_json(200, {})

    def _commit(self, query: dict[str, list[str]], repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        hub = self.state
        with hub.lock:
            found = self._repo(repo, write=True)
            if query.get("create_pr"):
                raise HubError(400, "this fake Hub does not open pull requests")
            if rev not in found.branches:
                raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "the commit must start with a header line")
            header = lines[0]["value"]
            parent = found.branches[rev]
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(found.commits[parent])
            for line in lines[1:]:  # validate everything before changing anything
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    tree[value["path"]] = hub._store_regular(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value["oid"]
                    size = hub.lfs_sizes.get((repo, oid))
                    if size is None or value.get("size", size) != size:
                        raise HubError(422, f"LFS object {oid} of {value['path']} was never uploaded to {repo}")
                    tree[value["path"]] = Entry(size=size, oid=oid, lfs=True)
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                elif key == "deletedFolder":
                    for name in [p for p in tree if p.startswith(value["path"].rstrip("/") + "/")]:
                        del tree[name]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            commit = hub._new_commit(found, parent, tree, header.get("summary", ""))
            found.branches[rev] = commit
        self._send_json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{commit}", "commitOid": commit,
                              "success": True, "pullRequestUrl": None})

    def _resolve(self, query: dict[str, list[str]], repo: str, rev: str, path: str) -> None:
        hub = self.state
        with hub.lock:
            found = self._repo(repo)
            commit = self._commit_of(found, rev)
            entry = found.commits[commit].get(path)
        if entry is None:
            raise HubError(404, f"{path} does not exist at {rev}", code="EntryNotFound", commit=commit)
        headers = {"ETag": f'"{entry.oid}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if self.command == "HEAD":
            self._send(200, b"", headers, content_type="application/octet-stream", length=entry.size)
            return
        data = hub.content(entry)
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if wanted:
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)) if wanted.group(2) else entry.size - 1, entry.size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
            self._send(206, data[start:end + 1], headers, content_type="application/octet-stream")
            return
        self._send(200, data, headers, content_type="application/octet-stream")


_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", r"/api/whoami-v2", _Handler._whoami),
    ("POST", r"/api/repos/create", _Handler._create_repo),
    ("POST", r"/api/validate-yaml", _Handler._validate_yaml),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", _Handler._model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _Handler._tree),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler._create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler._preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler._commit),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler._lfs_batch),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", _Handler._lfs_verify),
    ("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})", _Handler._lfs_put),
    ("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})/part/(?P<number>\d+)", _Handler._lfs_put_part),
    ("POST", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})/complete", _Handler._lfs_complete),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler._resolve),
]
