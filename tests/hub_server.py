"""A loopback Hugging Face hub for the tests: the requests huggingface_hub makes, answered from local folders.

    GET  /api/{models|datasets}/ORG/NAME/revision/REV[?blobs=True]   -> {id, sha, siblings: [{rfilename, size,
                                                                         blobId, lfs: {sha256, size, pointerSize}}]}
    HEAD /[datasets/]ORG/NAME/resolve/REV/FILE   -> X-Repo-Commit, ETag (sha256 for LFS files, else the git
                                                    blob sha1), X-Linked-Etag/X-Linked-Size, Content-Length
    GET  the same                                -> the bytes, honouring Range (206 + Content-Range)

Faults a test can ask for, per file name: `cut` (send N bytes, drop the connection, then answer 503 until
cleared: an interruption huggingface_hub's own retries cannot mend), `corrupt` (same size, other bytes),
`short` (fewer bytes than the listing says). A repo can be `gated` (401 GatedRepo without the right token).
Every request is recorded as (method, path, Range header).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")  # and any file over 100 kB, as the hub's .gitattributes do


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    repo_type: str = "model"
    gated: bool = False
    commit: str = ""

    def __post_init__(self) -> None:
        h = hashlib.sha1(self.repo_id.encode())  # a name, not security
        for name in sorted(self.files):
            h.update(name.encode() + self.files[name])
        self.commit = self.commit or h.hexdigest()

    def lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or len(self.files[name]) > 100_000

    def etag(self, name: str) -> str:
        body = self.files[name]
        if self.lfs(name):
            return hashlib.sha256(body).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()  # git's blob id

    def sibling(self, name: str) -> dict:
        body = self.files[name]
        out = {"rfilename": name, "size": len(body), "blobId": self.etag(name)}
        if self.lfs(name):
            out["lfs"] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
        return out


@dataclass
class Hub:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    token: str = "hf_loopback_token"
    cut: dict[str, int] = field(default_factory=dict)        # file -> bytes sent before the connection drops
    broken: set[str] = field(default_factory=set)            # files answering 503 (after a cut)
    corrupt: set[str] = field(default_factory=set)
    short: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""

    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        return repo

    def add_folder(self, repo_id: str, folder: Path, **kw) -> Repo:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        return self.add(Repo(repo_id, files, **kw))

    def clear_faults(self) -> None:
        self.cut.clear()
        self.broken.clear()
        self.corrupt.clear()
        self.short.clear()


def _route(path: str) -> tuple[str, str, str, str, str] | None:
    """(kind, repo_type, repo_id, revision, file) for an API or resolve path; None if neither."""
    parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
    if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] == "revision":
        return "api", parts[1].rstrip("s"), f"{parts[2]}/{parts[3]}", parts[5], ""
    repo_type = "model"
    if parts[:1] == ["datasets"]:
        repo_type, parts = "dataset", parts[1:]
    if len(parts) >= 5 and parts[2] == "resolve":
        return "resolve", repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
    return None


def send_body(handler: http.server.BaseHTTPRequestHandler, body: bytes, cut: int | None = None) -> None:
    """Write the body; with `cut`, only its first `cut` bytes, then drop the connection (an interrupted transfer)."""
    if cut is None:
        handler.wfile.write(body)
        return
    handler.wfile.write(body[:cut])
    handler.wfile.flush()
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def make_handler(hub: Hub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def error(self, code: int, error_code: str, message: str) -> None:
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def find(self) -> tuple[str, Repo, str] | None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            route = _route(self.path)
            repo = hub.repos.get(route[1:3]) if route else None
            if route is None or repo is None:
                self.error(401, "RepoNotFound", "Repository not found")  # what the hub says, unauthenticated
                return None
            kind, _, _, rev, name = route
            if rev not in ("main", repo.commit):
                self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            if kind == "resolve" and repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self.error(401, "GatedRepo", "Access to this model is restricted: accept its conditions")
                return None
            if kind == "resolve" and name not in repo.files:
                self.error(404, "EntryNotFound", f"{name} does not exist")
                return None
            return kind, repo, name

        def head_lines(self, repo: Repo, name: str, length: int) -> None:
            self.send_header("X-Repo-Commit", repo.commit)
            etag = repo.etag(name)
            self.send_header("ETag", f'"{etag}"')
            if repo.lfs(name):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(repo.files[name])))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def do_HEAD(self) -> None:
            found = self.find()
            if found and found[0] == "resolve":
                self.send_response(200)
                self.head_lines(found[1], found[2], len(found[1].files[found[2]]))
            elif found:
                self.send_response(200)
                self.end_headers()

        def do_GET(self) -> None:
            found = self.find()
            if found is None:
                return
            kind, repo, name = found
            if kind == "api":
                body = json.dumps({"id": repo.repo_id, "sha": repo.commit, "private": False,
                                   "gated": "manual" if repo.gated else False,
                                   "siblings": [repo.sibling(n) for n in repo.files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_file(repo, name)

        def send_file(self, repo: Repo, name: str) -> None:
            if name in hub.broken:
                self.error(503, "", "Service Unavailable")
                return
            body = repo.files[name]
            if name in hub.corrupt:
                body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
            if name in hub.short:
                body = body[:-10]
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.head_lines(repo, name, len(body) - start)
            cut = hub.cut.pop(name, None)
            if cut is not None:  # later requests get 503
                hub.broken.add(name)
            send_body(self, body[start:], cut)

    return Handler


class serve:
    """`with serve(hub) as url:` a threaded loopback server answering for `hub`."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.hub.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return self.hub.url

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
