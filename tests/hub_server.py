"""A small in-memory Hugging Face Hub on 127.0.0.1 for tests: the part of the Hub API that `huggingface_hub`
(2.x) and `from_pretrained` use, so `push_to_hub` and downloads run without a network.

Implemented: `whoami-v2`; `repos/create`; `validate-yaml` (README metadata); `preupload` (regular inline base64 files, LFS for weights); the git-LFS
batch API with basic single-part PUT uploads and verify; `commit` (NDJSON: header, file, lfsFile, deletedFile,
deletedFolder); `resolve` (HEAD/GET with `X-Repo-Commit`, `ETag`, `Content-Length`, error codes); model info and
tree listing. Uploads must go through LFS, not Xet: run the client with `HF_HUB_DISABLE_XET=1`.

Usage::

    with HubServer(token="hf_fake") as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

USER = "testuser"
MAX_BODY = 512 * 2**20  # refuse anything larger: this server is for tiny test models
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack")


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[str] = field(default_factory=list)
    history: list[dict[str, bytes]] = field(default_factory=list)


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 hex -> content
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions


def _commit_sha(repo_id: str, n: int, files: dict[str, bytes]) -> str:
    h = hashlib.sha1(f"{repo_id}:{n}".encode())
    for path in sorted(files):
        h.update(path.encode() + hashlib.sha256(files[path]).digest())
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ---- plumbing ----

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str, head: bool = False, headers=None):
        h = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
        self._send(status, json.dumps({"error": message}).encode(), h, head=head)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        return False

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _dispatch(self, method: str):
        url = urlparse(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append((method, path))
        try:
            for pattern, handler in ROUTES.get(method, []):
                m = re.fullmatch(pattern, path)
                if m:
                    return handler(self, *m.groups(), query=query)
            self._error(404, "NotFound", f"No route for {method} {path}", head=method == "HEAD")
        except Exception as e:  # report it to the client instead of dropping the connection
            self._error(500, "ServerError", f"{type(e).__name__}: {e}", head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---- API ----

    def whoami(self, query):
        if self._authorized():
            self._json(200, {"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": {}})

    def create_repo(self, query):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return
        if payload.get("type", "model") not in (None, "model"):
            return self._error(400, "BadRequest", "only model repos are supported")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                # As the Hub does: the 409 body names the repo's URL (huggingface_hub reads it with exist_ok=True).
                message = "You already created this model repo"
                body = json.dumps({"error": message, "url": f"{self.base}/{repo_id}"}).encode()
                return self._send(409, body, {"X-Error-Code": "RepoExists", "X-Error-Message": message})
            repo = Repo()
            repo.files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.commits.append(_commit_sha(repo_id, 0, repo.files))
            repo.history.append(dict(repo.files))
            self.state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query):
        payload = json.loads(self._body())
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            front = content.split("---", 2)
            try:
                if len(front) < 3 or not isinstance(yaml.safe_load(front[1]) or {}, dict):
                    errors.append({"message": "metadata must be a YAML mapping between two `---` lines"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, repo_id, revision, query):
        payload = json.loads(self._body())
        if not self._authorized() or (repo := self._repo(repo_id)) is None:
            return
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._json(200, {"files": files, "commitOid": repo.commits[-1]})

    def lfs_batch(self, repo_id, query):
        payload = json.loads(self._body())
        if not self._authorized() or self._repo(repo_id) is None:
            return
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            return self._error(400, "BadRequest", "only basic uploads are supported")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.base}/_lfs_verify/{obj['oid']}"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid, query):
        body = self._body()
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 of the uploaded content does not match the oid")
        with self.state.lock:
            self.state.lfs[oid] = body
        self._send(200)

    def lfs_verify(self, oid, query):
        payload = json.loads(self._body())
        if oid not in self.state.lfs or len(self.state.lfs[oid]) != payload.get("size"):
            return self._error(404, "EntryNotFound", f"LFS object {oid} was not uploaded")
        self._json(200, {})

    def commit(self, repo_id, revision, query):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not self._authorized() or (repo := self._repo(repo_id)) is None:
            return
        if revision != "main":
            return self._error(404, "RevisionNotFound", f"Only the main branch exists, got {revision}")
        with self.state.lock:
            files = dict(repo.files)
            lfs_paths = set(repo.lfs_paths)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    continue
                if key == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "BadRequest", "file content must be base64")
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs_paths.discard(value["path"])
                elif key == "lfsFile":
                    content = self.state.lfs.get(value["oid"])
                    if content is None:
                        return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = content
                    lfs_paths.add(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, "BadRequest", f"unknown commit operation {key}")
            repo.files, repo.lfs_paths = files, lfs_paths
            sha = _commit_sha(repo_id, len(repo.commits), files)
            repo.commits.append(sha)
            repo.history.append(dict(files))
        self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.base}/{repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return repo.commits[-1], repo.files
        if revision in repo.commits:
            return revision, repo.history[repo.commits.index(revision)]
        return None

    def resolve(self, repo_id, revision, filename, query, head=False):
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        snap = self._snapshot(repo, revision)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        sha, files = snap
        if filename not in files:
            return self._error(
                404,
                "EntryNotFound",
                f"{filename} does not exist at {revision}",
                head=head,
                headers={"X-Repo-Commit": sha},
            )
        content = files[filename]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
        }
        self._send(200, content, headers, head=head)

    def resolve_head(self, repo_id, revision, filename, query):
        self.resolve(repo_id, revision, filename, query, head=True)

    def model_info(self, repo_id, revision=None, query=None):
        repo = self._repo(repo_id)
        if repo is None:
            return
        snap = self._snapshot(repo, revision or "main")
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = snap
        siblings = [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "tags": [], "siblings": siblings},
        )

    def tree(self, repo_id, revision, path, query):
        repo = self._repo(repo_id)
        if repo is None:
            return
        snap = self._snapshot(repo, revision)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        _, files = snap
        prefix = (path or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for p, content in sorted(files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1 :] if prefix else p
            if "/" in rest and not recursive:
                folder = (prefix + "/" if prefix else "") + rest.split("/")[0]
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                continue
            oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
            entries.append({"type": "file", "oid": oid, "size": len(content), "path": p})
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist at {revision}")
        self._json(200, entries)


_REPO = r"([^/]+/[^/]+)"
ROUTES = {
    "GET": [
        (r"/api/whoami-v2", _Handler.whoami),
        (rf"/api/models/{_REPO}", _Handler.model_info),
        (rf"/api/models/{_REPO}/revision/([^/]+)", _Handler.model_info),
        (rf"/api/models/{_REPO}/tree/([^/]+)/?(.*)", _Handler.tree),
        (rf"/{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
    ],
    "HEAD": [(rf"/{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve_head)],
    "POST": [
        (r"/api/repos/create", _Handler.create_repo),
        (r"/api/validate-yaml", _Handler.validate_yaml),
        (rf"/api/models/{_REPO}/preupload/([^/]+)", _Handler.preupload),
        (rf"/api/models/{_REPO}/commit/([^/]+)", _Handler.commit),
        (r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", _Handler.lfs_batch),
        (r"/_lfs_verify/([0-9a-f]{64})", _Handler.lfs_verify),
    ],
    "PUT": [(r"/_lfs/([0-9a-f]{64})", _Handler.lfs_put)],
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """The in-memory Hub, served from a background thread for the duration of a `with` block."""

    def __init__(self, token: str = "hf_fake_token", timeout: float = 60.0):
        self.state = HubState(token)
        self.timeout = timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._server.timeout = self.timeout
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
