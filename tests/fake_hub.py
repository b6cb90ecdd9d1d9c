"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, enough for create_repo + create_commit.

Point ``HF_ENDPOINT`` at :attr:`FakeHub.endpoint`; every request is recorded, and committed files land
in :attr:`FakeHub.files` (``{repo_id: {path: bytes}}``). Uploads are answered as "regular" (the file's
bytes travel base64-encoded inside the commit request), so no LFS/Xet storage is involved.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.created: list[dict] = []
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    return self.rfile.read(length)
                if self.headers.get("Transfer-Encoding") == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().strip(), 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return b""

            def _reply(self, status: int, payload: dict | None = None) -> None:
                body = json.dumps(payload or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 404:
                    self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": "not found"})

            do_HEAD = do_GET

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path))
                body = self._body()
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created.append(request)
                    repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":  # the client checks a README.md's metadata header first
                    hub.validated.append(json.loads(body))
                    return self._reply(200, {"errors": [], "warnings": []})
                if match := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", self.path):
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]})
                if match := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", self.path):
                    repo_id = match.group(1)
                    stored = hub.files.setdefault(repo_id, {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commits.append(item["value"])
                        elif item["key"] == "file":
                            value = item["value"]
                            stored[value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {
                        "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'0' * 40}",
                        "commitOid": "0" * 40, "pullRequestUrl": None,
                    })
                return self._reply(404, {"error": f"unexpected POST {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
