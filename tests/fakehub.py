"""A minimal stand-in for the Hugging Face Hub's file endpoints, on 127.0.0.1.

It answers HEAD and GET for ``/{repo_id}/resolve/{revision}/{filename}`` with the headers the
real huggingface_hub client reads (X-Repo-Commit, ETag, Content-Length), so tests drive the
real client through HF_ENDPOINT. ``mode`` switches on failures: "tamper" serves other bytes
than were announced, "truncate" closes the connection half-way through the body, "huge"
announces a terabyte and streams zeros without end, "trickle" sends a byte every half second,
"silent" accepts the request and never answers it (until the server stops).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.mode = "ok"
        self.requests: list[str] = []
        self.stopping = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _find(self):
                hub.requests.append(f"{self.command} {self.path}")
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if "resolve" not in parts:
                    return None
                i = parts.index("resolve")
                key = ("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:]))
                return key, hub.files.get(key)

            def _headers(self, key, data):
                body = data if hub.mode != "tamper" else bytes(reversed(data))
                self.send_response(200)
                self.send_header("X-Repo-Commit", key[1])
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(10**12 if hub.mode == "huge" else len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                return body

            def _missing(self):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                found = self._find()
                if not found or found[1] is None:
                    return self._missing()
                self._headers(*found)

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                """Just enough of the upload API: create repo, preupload (all 'regular'), commit."""
                hub.requests.append(f"POST {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(body)
                    repo = f"{name.get('organization') or 'user'}/{name['name']}" if "/" not in name["name"] else name["name"]
                    return self._json({"url": f"{hub.url}/{repo}", "name": repo})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                  "oid": None} for f in files]})
                if "/commit/" in path:
                    repo = path[len("/api/models/"):].split("/commit/")[0]
                    commit = hashlib.sha1(body).hexdigest()
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            hub.files[(repo, commit, value["path"])] = base64.b64decode(value["content"])
                    return self._json({"commitOid": commit, "commitUrl": f"{hub.url}/{repo}/commit/{commit}",
                                       "pullRequestUrl": None})
                self._json({"error": "not implemented in FakeHub"}, 404)

            def do_GET(self):
                found = self._find()
                if not found or found[1] is None:
                    return self._missing()
                if hub.mode == "silent":
                    hub.stopping.wait(60)
                    return
                body = self._headers(*found)
                if hub.mode in ("huge", "trickle"):
                    try:
                        while not hub.stopping.is_set():
                            self.wfile.write(b"\0" * 65536 if hub.mode == "huge" else b"\0")
                            self.wfile.flush()
                            if hub.mode == "trickle":
                                hub.stopping.wait(0.5)
                    except OSError:
                        pass
                    return
                if hub.mode == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()
