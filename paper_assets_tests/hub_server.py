"""A small Hugging Face Hub-protocol server for the tests (127.0.0.1 only, in-memory, one thread per request).

Implements what ``huggingface_hub`` uses to create a dataset repo, commit (preupload, LFS batch + upload,
ndjson commit with ``parentCommit`` -> 412 when stale), read (repo info, paths-info with LFS sha256, tree,
commits) and download (``resolve``). Faults can be injected per route: an HTTP status returned instead of
handling the request, or after handling it (the work is done but the client sees an error).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_testtoken0123456789abcdef"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    size: int
    lfs_sha256: str | None
    content: bytes  # for LFS files, the object itself (kept here for downloads)

    @property
    def git_oid(self) -> str:
        if self.lfs_sha256:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.lfs_sha256}\nsize {self.size}\n"
            return git_sha1(pointer.encode())
        return git_sha1(self.content)


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


@dataclass
class Fault:
    method: str
    pattern: str
    status: int
    times: int = 1
    after: bool = False  # handle the request first, then answer with the error
    headers: dict = field(default_factory=dict)


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.before_commit_hooks: list = []
        self.lock = threading.RLock()

    def new_commit(self, repo: Repo, branch: str, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.branches.get(branch)
        commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], parent, message, files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def commit_count(self, repo_id: str, branch: str = "main") -> int:
        repo, count = self.repos[repo_id], 0
        sha = repo.branches.get(branch)
        while sha:
            count += 1
            sha = repo.commits[sha].parent
        return count

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        return self.repos[repo_id].resolve(revision).files

    def inject(self, method: str, pattern: str, status: int, times: int = 1, after: bool = False,
               headers: dict | None = None) -> None:
        self.faults.append(Fault(method, pattern, status, times, after, headers or {}))


_REPO = r"(?P<repo>[^/]+/[^/]+)"


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              head: bool = False) -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        ctype = "application/octet-stream" if raw is not None else "application/json"
        self.send_header("Content-Type", ctype)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _fault(self, method: str, path: str, after: bool) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.method == method and fault.after == after and re.search(fault.pattern, path) and fault.times:
                    fault.times -= 1
                    return fault
        return None

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path = url.path
        self.state.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        if method == "POST" and "/commit/" in path:
            # Another client committing "at the same time": runs outside the lock, through the real protocol.
            while self.state.before_commit_hooks:
                self.state.before_commit_hooks.pop(0)(self.state)
        fault = self._fault(method, path, after=False)
        if fault:
            return self._send(fault.status, {"error": "injected"}, fault.headers)
        routes = [
            ("POST", r"^/api/repos/create$", self.create_repo),
            ("POST", r"^/api/validate-yaml$", lambda m, b, q: self._send(200, {"errors": [], "warnings": []})),
            ("GET", rf"^/api/datasets/{_REPO}(/revision/(?P<rev>.+))?$", self.repo_info),
            ("POST", rf"^/api/datasets/{_REPO}/branch/(?P<branch>.+)$", self.create_branch),
            ("POST", rf"^/api/datasets/{_REPO}/preupload/(?P<rev>.+)$", self.preupload),
            ("POST", rf"^/datasets/{_REPO}\.git/info/lfs/objects/batch$", self.lfs_batch),
            ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", self.lfs_upload),
            ("POST", rf"^/api/datasets/{_REPO}/commit/(?P<rev>.+)$", self.commit),
            ("POST", rf"^/api/datasets/{_REPO}/paths-info/(?P<rev>.+)$", self.paths_info),
            ("GET", rf"^/api/datasets/{_REPO}/tree/(?P<rev>[^/]+)(/(?P<path>.*))?$", self.tree),
            ("GET", rf"^/api/datasets/{_REPO}/commits/(?P<rev>.+)$", self.commits),
            ("GET", rf"^/datasets/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self.resolve),
            ("HEAD", rf"^/datasets/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self.resolve),
        ]
        for route_method, pattern, handler in routes:
            match = re.match(pattern, path)
            if route_method == method and match:
                with self.state.lock:
                    after = self._fault(method, path, after=True)
                    if after:
                        self._handle_silently(handler, match, body, parse_qs(url.query))
                        return self._send(after.status, {"error": "injected after handling"}, after.headers)
                    return handler(match, body, parse_qs(url.query))
        self._error(404, f"no route for {method} {path}")

    def _handle_silently(self, handler, match, body, query) -> None:
        original = self._send
        self._send = lambda *a, **k: None  # type: ignore[method-assign]
        try:
            handler(match, body, query)
        finally:
            self._send = original  # type: ignore[method-assign]

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    # -- routes --------------------------------------------------------------------------------------------------
    def _repo(self, match) -> Repo | None:
        repo = self.state.repos.get(match.group("repo"))
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _commit_at(self, match) -> Commit | None:
        """The commit a ``rev`` in the URL names, or None after answering 404."""
        repo = self._repo(match)
        if repo is None:
            return None
        commit = repo.resolve(match.group("rev"))
        if commit is None:
            self._error(404, "Invalid rev id", "RevisionNotFound")
        return commit

    def create_repo(self, match, body, query):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        data = json.loads(body)
        repo_id = f"{data.get('organization') or 'user'}/{data['name']}"
        if data.get("type") != "dataset":
            return self._error(400, "only dataset repos are served here")
        url = f"http://{self.headers['Host']}/datasets/{repo_id}"
        if repo_id in self.state.repos:  # the Hub answers 409 with the existing repo's url
            return self._send(409, {"error": "You already created this dataset repo", "url": url},
                              {"X-Error-Message": "You already created this dataset repo"})
        repo = Repo(private=bool(data.get("private")))
        self.state.repos[repo_id] = repo
        self.state.new_commit(repo, "main", "initial commit", {
            ".gitattributes": StoredFile(22, None, b"*.parquet filter=lfs\n")})
        self._send(200, {"url": url, "name": repo_id})

    def repo_info(self, match, body, query):
        repo = self._repo(match)
        if repo is None:
            return
        commit = repo.resolve(match.group("rev") or "main")
        if commit is None:
            return self._error(404, "Invalid rev id", "RevisionNotFound")
        self._send(200, {"id": match.group("repo"), "sha": commit.sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": [], "downloads": 0,
                         "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z"})

    def create_branch(self, match, body, query):
        repo = self._repo(match)
        if repo is None:
            return
        branch = unquote(match.group("branch"))
        if branch in repo.branches:
            return self._error(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start).sha
        self._send(200, {})

    def preupload(self, match, body, query):
        if self._repo(match) is None:
            return
        files = json.loads(body)["files"]
        self._send(200, {"files": [
            {"path": f["path"], "uploadMode": "regular" if f["path"].endswith((".md", ".gitattributes")) else "lfs",
             "shouldIgnore": False} for f in files]})

    def lfs_batch(self, match, body, query):
        if not self._authorized():
            return self._error(401, "Invalid credentials")
        data = json.loads(body)
        host = self.headers["Host"]
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"http://{host}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, match, body, query):
        oid = match.group("oid")
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        self.state.lfs[oid] = body
        self._send(200, {})

    def commit(self, match, body, query):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        repo = self._repo(match)
        if repo is None:
            return
        branch = unquote(match.group("rev"))
        if branch not in repo.branches:
            return self._error(404, "Invalid rev id", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.branches[branch]:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.resolve(branch).files)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = StoredFile(len(content), None, content)
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = StoredFile(value["size"], value["oid"], self.state.lfs[value["oid"]])
            elif line["key"] == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            else:
                return self._error(400, f"unsupported operation {line['key']}")
        commit = self.state.new_commit(repo, branch, header.get("summary", ""), files)
        host = self.headers["Host"]
        self._send(200, {"success": True, "commitOid": commit.sha,
                         "commitUrl": f"http://{host}/datasets/{match.group('repo')}/commit/{commit.sha}"})

    def _entry(self, path: str, stored: StoredFile) -> dict:
        entry = {"type": "file", "path": path, "size": stored.size, "oid": stored.git_oid}
        if stored.lfs_sha256:
            entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size, "pointerSize": 134}
        return entry

    def paths_info(self, match, body, query):
        commit = self._commit_at(match)
        if commit is None:
            return
        form = parse_qs(body.decode())
        entries = []
        for path in form.get("paths", []):
            if path in commit.files:
                entries.append(self._entry(path, commit.files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                entries.append({"type": "directory", "path": path, "oid": "0" * 40})
        self._send(200, entries)

    def tree(self, match, body, query):
        commit = self._commit_at(match)
        if commit is None:
            return
        folder = unquote(match.group("path") or "").strip("/")
        prefix = folder + "/" if folder else ""
        entries, folders = [], set()
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and query.get("recursive", ["false"])[0].lower() != "true":
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(self._entry(path, stored))
        if folder and not entries and not folders:
            return self._error(404, f"{folder} does not exist", "EntryNotFound")
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self._send(200, entries)

    def commits(self, match, body, query):
        repo = self._repo(match)
        if repo is None:
            return
        commit = repo.resolve(match.group("rev"))
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.message, "message": commit.message, "authors": [],
                        "date": "2026-01-01T00:00:00.000Z"})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send(200, out)

    def resolve(self, match, body, query):
        commit = self._commit_at(match)
        if commit is None:
            return
        path = unquote(match.group("path"))
        stored = commit.files.get(path)
        if stored is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.git_oid}"'}
        if stored.lfs_sha256:
            headers.update({"X-Linked-Etag": f'"{stored.lfs_sha256}"', "X-Linked-Size": stored.size})
        self._send(200, raw=stored.content, headers=headers, head=self.command == "HEAD")


class HubServer:
    def __init__(self):
        self.state = HubState()
        self.handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def reset(self) -> HubServer:
        self.state = self.handler.state = HubState()
        return self

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
