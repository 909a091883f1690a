"""A stand-in for the Hugging Face Hub on loopback, serving the endpoints huggingface_hub
calls for model_info, snapshot_download and hf_hub_download (repo info with siblings,
the tree listing, resolve/{revision}/{file} with the X-Repo-Commit and ETag headers it
needs, Range requests for resumed downloads), and recording which files were fetched.
Use: `with HubStub(repos) as hub: monkeypatch.setenv("HF_ENDPOINT", hub.url)`."""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class StubRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False  # files refused (401 GatedRepo); the listing is public, as on the hub
    branches: tuple[str, ...] = ("main",)
    broken: set[str] = field(default_factory=set)  # files the stub refuses (HTTP 500)


@dataclass
class HubStub:
    repos: dict[str, StubRepo]
    fetched: list[str] = field(default_factory=list)   # "repo/file" of each GET of a file's bytes
    requests: list[str] = field(default_factory=list)  # "METHOD path" of every request
    ranges: list[str] = field(default_factory=list)    # Range headers of file GETs (resumed downloads)

    def __enter__(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                stub.requests.append(f"HEAD {self.path}")
                self._serve(head=True)

            def do_GET(self):
                stub.requests.append(f"GET {self.path}")
                self._serve(head=False)

            def _json(self, value, status=200, headers=None):
                body = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status, code, message):
                self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

            def _repo(self, repo_id: str, revision: str | None):
                repo = stub.repos.get(repo_id)
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if revision not in (None, repo.commit, *repo.branches):
                    self._error(404, "RevisionNotFound", "Invalid rev id")
                    return None
                return repo

            def _serve(self, head: bool):
                path = unquote(urlsplit(self.path).path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    rest = parts[4:]
                    revision = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else None
                    repo = self._repo(repo_id, revision)
                    if repo is None:
                        return
                    if rest and rest[0] == "tree":
                        self._json([{"type": "file", "path": n, "size": len(b), "oid": _sha1(b)}
                                    for n, b in sorted(repo.files.items())])
                        return
                    self._json({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                                "gated": False, "siblings": [{"rfilename": n, "size": len(b), "blobId": _sha1(b)}
                                                             for n, b in sorted(repo.files.items())]})
                    return
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    repo = self._repo(repo_id, revision)
                    if repo is None:
                        return
                    if repo.gated:  # as the hub: a gated repo's listing is public, its files are not
                        self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it.")
                        return
                    if name not in repo.files:
                        self._error(404, "EntryNotFound", "Entry not found")
                        return
                    self._file(repo_id, repo, name, head)
                    return
                self._error(404, "NotFound", f"no route {path}")

            def _file(self, repo_id, repo, name, head):
                data = repo.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    stub.ranges.append(rng)
                if rng and rng.startswith("bytes=") and not head:
                    start = int(rng[len("bytes="):].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{_sha256(data)}"')
                self.send_header("Content-Length", str(len(data) if head else len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if name in repo.broken:
                    self._error(500, "Internal", "the stub refuses this file")
                    return
                if not head:
                    stub.fetched.append(f"{repo_id}/{name}")
                    self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def directory_files(path: Path) -> dict[str, bytes]:
    """A directory's files as a StubRepo's files."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
