"""A Semantic Scholar API server for the tests, built from S2's documented formats (``engine/s2_api.py`` cites
them): Datasets API releases, dataset files behind pre-signed-style URLs (gzipped JSON lines, HTTP range
requests), diffs between consecutive releases, and the Graph API's batch endpoint with rate limiting (429)."""

from __future__ import annotations

import gzip
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from paper_assets.local_services import free_port

FILES_PER_DATASET = 2


def _gzip_lines(records: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode(), mtime=0)


@dataclass
class S2State:
    api_key: str
    releases: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # release -> dataset -> records
    vectors: dict[int, list[float]] = field(default_factory=dict)
    throttle_next: int = 0  # answer this many Graph API requests with 429 first
    cut_once: set[str] = field(default_factory=set)  # file names whose next download stops half way
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def file_requests(self, name: str) -> list[str]:
        """The Range header of each request for file ``name`` ('' for a request from the start)."""
        return [rng for _, path, rng in self.requests if path.endswith("/" + name)]


def _by_id(records: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for record in records:
        grouped.setdefault(int(record["corpusid"]), []).append(record)
    return grouped


class FakeS2:
    """``with FakeS2(key) as s2:`` serves at ``s2.url``; ``s2.add_release(id, papers, abstracts)``."""

    def __init__(self, api_key: str = "test-key"):
        self.state = S2State(api_key=api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def add_release(self, release: str, papers: list[dict], abstracts: list[dict]) -> None:
        self.state.releases[release] = {"papers": papers, "abstracts": abstracts}
        for dataset, records in self.state.releases[release].items():
            for part in range(FILES_PER_DATASET):
                name = f"{release}/{dataset}/{dataset}-part{part}.jsonl.gz"
                self.state.files[name] = _gzip_lines(records[part::FILES_PER_DATASET])

    def file_url(self, name: str) -> str:
        return f"{self.url}/files/{name}?X-Amz-Expires=3600&X-Amz-Signature=abc123"

    def _diff(self, old: str, new: str, dataset: str) -> dict:
        before, after = (_by_id(self.state.releases[r][dataset]) for r in (old, new))
        updates = [rec for cid, recs in sorted(after.items()) if before.get(cid) != recs for rec in recs]
        deletes = [{"corpusid": cid} for cid in sorted(set(before) - set(after))]
        names = {}
        for kind, records in (("update", updates), ("delete", deletes)):
            names[kind] = f"diffs/{old}_to_{new}/{dataset}/{kind}-0.jsonl.gz"
            self.state.files[names[kind]] = _gzip_lines(records)
        return {"from_release": old, "to_release": new, "update_files": [self.file_url(names["update"])],
                "delete_files": [self.file_url(names["delete"])]}

    def answer(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict, bytes]:
        with self.state.lock:
            self.state.requests.append((method, path, headers.get("Range", "")))
        if path.startswith("/files/"):
            return self._file(path.removeprefix("/files/"), headers.get("Range", ""))
        if headers.get("x-api-key") != self.state.api_key:
            return 403, {}, json.dumps({"message": "Forbidden"}).encode()
        releases = sorted(self.state.releases)
        parts = path.strip("/").split("/")
        if parts[:3] == ["datasets", "v1", "release"] and len(parts) == 3:
            return self._json(releases)
        if parts[:3] == ["datasets", "v1", "release"] and len(parts) == 4:
            release = releases[-1] if parts[3] == "latest" else parts[3]
            return self._json({"release_id": release, "README": "fake", "datasets": [
                {"name": d, "description": d, "README": ""} for d in ("papers", "abstracts")]})
        if parts[:3] == ["datasets", "v1", "release"] and len(parts) == 6 and parts[4] == "dataset":
            release, dataset = parts[3], parts[5]
            if release not in self.state.releases:
                return 404, {}, b"{}"
            return self._json({"name": dataset, "description": "", "README": "", "files": [
                self.file_url(f"{release}/{dataset}/{dataset}-part{p}.jsonl.gz") for p in range(FILES_PER_DATASET)]})
        if parts[:3] == ["datasets", "v1", "diffs"] and len(parts) == 7 and parts[4] == "to":
            start, end, dataset = parts[3], releases[-1] if parts[5] == "latest" else parts[5], parts[6]
            if start not in releases or end not in releases:
                return 404, {}, b"{}"
            chain = releases[releases.index(start):releases.index(end) + 1]
            return self._json({"dataset": dataset, "start_release": start, "end_release": end,
                               "diffs": [self._diff(a, b, dataset) for a, b in zip(chain, chain[1:], strict=False)]})
        if path == "/graph/v1/paper/batch" and method == "POST":
            return self._batch(query, json.loads(body))
        return 404, {}, b"{}"

    def _json(self, value) -> tuple[int, dict, bytes]:
        return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()

    def _file(self, name: str, range_header: str) -> tuple[int, dict, bytes]:
        data = self.state.files.get(name)
        if data is None:
            return 404, {}, b""
        start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header else 0
        if start >= len(data):
            return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
        headers = {"Content-Length": str(len(data) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if name.rsplit("/", 1)[-1] in self.state.cut_once:
            self.state.cut_once.discard(name.rsplit("/", 1)[-1])
            return (206 if start else 200), {**headers, "X-Cut": "1"}, data[start:start + (len(data) - start) // 2]
        return (206 if start else 200), headers, data[start:]

    def _batch(self, query: dict, body: dict) -> tuple[int, dict, bytes]:
        if query.get("fields") != ["embedding.specter_v2"]:
            return 400, {}, b'{"error": "unsupported fields"}'
        if len(body["ids"]) > 500:
            return 400, {}, b'{"error": "at most 500 ids"}'
        with self.state.lock:
            if self.state.throttle_next > 0:
                self.state.throttle_next -= 1
                return 429, {"Retry-After": "0"}, b'{"message": "Too Many Requests"}'
        answer = []
        for raw in body["ids"]:
            corpusid = int(raw.removeprefix("CorpusId:"))
            vector = self.state.vectors.get(corpusid)
            answer.append(None if vector is None else {
                "paperId": f"{corpusid:040x}", "embedding": {"model": "specter_v2", "vector": vector}})
        return self._json(answer)

    def __enter__(self) -> FakeS2:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                parsed = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, payload = fake.answer(method, parsed.path, parse_qs(parsed.query), self.headers,
                                                       body)
                cut = headers.pop("X-Cut", None)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if cut:  # announce the whole file, send half, drop the connection
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
