"""What ``deepscan scan --server`` and ``deepscan serve --status/--stop`` speak to a service: HTTP
over its Unix socket or TCP, with the standard library's ``http.client`` (importing an HTTP
library would cost the cold client what the service saves it; http.client parses the responses,
chunked streams included, and only the Unix socket's connect is ours).

A scan through a service plans its inputs here (folders walked, --shard, --resume against
--output), sends them, and feeds the records it gets back into the same sink a local scan uses:
the same stdout, --output file, table, report and exit code. When the service is gone, or runs
another checkpoint or other settings, the scan runs here instead, after one notice.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigError

SOCKET_NAME = "deepscan.sock"
CONNECT_TIMEOUT_S = 5.0


def default_socket() -> Path:
    """``$XDG_RUNTIME_DIR/deepscan.sock`` (a per-user folder, 0700, made by the login manager);
    without it ``/tmp/deepscan-UID/deepscan.sock``, in a 0700 folder of this user's."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / SOCKET_NAME
    return Path(f"/tmp/deepscan-{os.getuid()}") / SOCKET_NAME


def private_folder(folder: Path) -> None:
    """Make (or check) a folder only its owner may enter: the fallback socket's home in /tmp."""
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"{folder}: not a private folder of this user's (owner {st.st_uid}, mode "
                          f"{stat.S_IMODE(st.st_mode):o}); remove it or pass --socket PATH elsewhere")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Door:
    """Where a service listens: a Unix socket path, or an http:// URL (with its token)."""

    socket: str | None = None
    url: str | None = None
    token: str | None = None

    @classmethod
    def parse(cls, value: str | None) -> "Door":
        """``--server``'s value: a socket path, an http://HOST:PORT URL, or ``default`` (or empty)."""
        value = (value or "").strip()
        if value in ("", "default", "1"):
            return cls(socket=str(default_socket()))
        if value.startswith(("http://", "https://")):
            if value.startswith("https://"):
                raise ConfigError(f"--server {value}: the service speaks plain HTTP on a local port; use http://")
            return cls(url=value.rstrip("/"), token=os.environ.get("DEEPSCAN_TOKEN") or None)
        return cls(socket=value)

    def __str__(self) -> str:
        return self.socket or self.url or "?"

    def connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.socket is not None:
            return _UnixConnection(self.socket, timeout)
        parts = urlsplit(self.url)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, *, timeout: float | None = CONNECT_TIMEOUT_S,
                content_type: str = "application/json"):
        """(connection, response); the caller reads and closes. Raises OSError when nothing answers."""
        conn = self.connect(timeout)
        headers = {"Content-Type": content_type} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn, conn.getresponse()
        except (http.client.HTTPException, ValueError) as exc:
            conn.close()
            raise ConnectionError(f"not a deepscan service ({type(exc).__name__})") from None
        except BaseException:
            conn.close()
            raise

    def get_json(self, path: str, timeout: float = CONNECT_TIMEOUT_S) -> tuple[int, dict]:
        conn, resp = self.request("GET", path, timeout=timeout)
        try:
            data = resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                raise ConnectionError("not a deepscan service (its answer is not JSON)") from None
        finally:
            conn.close()


def why_not(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no socket there"
    if isinstance(exc, ConnectionRefusedError):
        return "nothing listens there"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "it did not answer in time"
    if isinstance(exc, PermissionError):
        return "permission denied (another user's service?)"
    return str(exc) or type(exc).__name__


def status(door: Door) -> tuple[bool, str]:
    """(ready, one line saying so)."""
    try:
        code, health = door.get_json("/v1/health")
    except OSError as exc:
        return False, f"no deepscan service at {door} ({why_not(exc)})"
    if code != 200 or not health.get("ready"):
        return False, f"the deepscan service at {door} is not ready ({health.get('error') or code})"
    return True, (f"ready at {door}: {health.get('open', 0)} request(s) open, {health.get('waiting', 0)} input(s) "
                  f"waiting, {health.get('scanned', 0)} scanned")


# ---------------------------------------------------------------------------- a scan through a service
SETTINGS_COMPARED = ("clips", "threshold", "aggregation", "min_face", "hash_files", "timeout_s")


def mismatch(req, info: dict) -> str | None:
    """Why the service cannot give the records this request would get here (None: it can)."""
    if req.heatmaps is not None:
        return "it does not write heatmaps (--heatmaps)"
    if req.ray:
        return "--ray asks for a Ray scan"
    ckpt = info.get("checkpoint", {})
    if req.weights is not None:
        if not _same_file(req.weights, ckpt):
            from ..hashing import sha256_file

            try:
                if sha256_file(req.weights) != info["model"]["sha256"]:
                    return f"it runs another checkpoint ({info['model'].get('checkpoint')})"
            except OSError:
                return None  # let the local scan say what is wrong with the file
    elif not ckpt.get("default") or ckpt.get("variant") != req.variant:
        return f"it runs {info['model'].get('checkpoint')}, not the default model" + (
            f" for --variant {req.variant}" if req.variant else "")
    theirs = info.get("settings", {})
    ours = {k: getattr(req.settings, k) for k in SETTINGS_COMPARED}
    for key, value in ours.items():
        if theirs.get(key) != value:
            return f"it runs {key} {theirs.get(key)!r}, this scan asks for {value!r}"
    runtime = info.get("runtime", {})
    asked = {"detector": (req.detector, info.get("detector")), "device": (req.device, runtime.get("device")),
             "precision": (req.precision, runtime.get("precision")), "backend": (req.backend, runtime.get("backend")),
             "preparation": (req.preparation, theirs.get("preparation")),
             "decoder": (req.decoder, theirs.get("decoder"))}
    for key, (want, have) in asked.items():
        if want != "auto" and want != have:
            return f"it runs --{key} {have}, this scan asks for {want}"
    if bool(req.compile) != bool(runtime.get("compile")):
        return "--compile differs"
    return None


def _same_file(path: Path, ckpt: dict) -> bool:
    try:
        st = os.stat(path)
        return (os.path.realpath(path) == ckpt.get("path") and st.st_size == ckpt.get("size")
                and st.st_mtime_ns == ckpt.get("mtime_ns"))
    except OSError:
        return False


def scan_via(server: str | None, req, say):
    """The scan ``req`` through the service at ``server`` (see ``Door.parse``): a
    ``run.ScanOutcome``, or None after one notice when the scan must run here instead."""
    from ..scan.plan import open_output, plan_inputs, settings_key

    door = Door.parse(server)
    try:
        code, info = door.get_json("/v1/info")
    except OSError as exc:
        say(f"note: no deepscan service at {door} ({why_not(exc)}); scanning here")
        return None
    if code != 200 or info.get("schema") != "deepscan.service/1":
        say(f"note: the service at {door} answered {code} ({info.get('error', 'not a deepscan service')}); "
            "scanning here")
        return None
    why = mismatch(req, info)
    if why is not None:
        say(f"note: the deepscan service at {door} cannot give this scan's records: {why}; scanning here")
        return None
    settings = info["settings"]
    key = settings_key({"model": info["model"], "threshold": settings["threshold"],
                        "aggregation": settings["aggregation"], "detector": info["detector"],
                        "settings": {"clips": settings["clips"], "min_face": settings["min_face"]}})
    file, done = open_output(req)
    try:
        inputs = list(plan_inputs(req, file, done, key, say))
        return _stream(door, req, info, inputs, file, say)
    finally:
        if file is not None:
            file.close()


def _stream(door: Door, req, info: dict, inputs: list, file, say):
    from ..checkpoint import read_info
    from ..output import progress
    from ..scan.assemble import error_record, row_of
    from ..output import warn_untrained
    from ..scan.run import ScanOutcome, _say_model, _sink, _until_stopped

    ckpt = Path(req.weights) if req.weights is not None else Path(info["checkpoint"]["path"])
    sink = _sink(req, file, say)
    outcome = ScanOutcome(sink, read_info(ckpt), ckpt, info["detector"], sha256=info["model"]["sha256"])
    if outcome.info.untrained:  # what a local scan says of its model, said here too
        warn_untrained(str(ckpt))
    _say_model(outcome.info, say)
    shown = [(os.path.abspath(i.path), i.path) for i in inputs]
    body = json.dumps({"inputs": [{"path": a, "key": i.key, "error": i.error} for (a, _), i in zip(shown, inputs)],
                       "expect": {"sha256": info["model"]["sha256"],
                                  "settings": {k: info["settings"][k] for k in SETTINGS_COMPARED}}}).encode()
    got = 0
    problem = None
    with progress(len(inputs), "scanning", enabled=not req.json_out) as advance, _until_stopped(outcome):
        if not inputs:
            return outcome
        conn = None
        try:
            conn, resp = door.request("POST", "/v1/scan", body, timeout=CONNECT_TIMEOUT_S)
            if resp.status != 200:
                problem = f"it refused the request ({resp.status}: {_message(resp)})"
            else:
                conn.sock.settimeout(None)  # a record may take long: the service's own --timeout bounds a video
                while got < len(inputs) and (line := resp.readline()):
                    record = _as_given(json.loads(line), *shown[got])
                    got += 1
                    sink(record, row_of(record))
                    advance()
                if got < len(inputs):
                    problem = "it stopped before the end of the scan"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem = f"the connection failed ({why_not(exc) if isinstance(exc, OSError) else type(exc).__name__})"
        finally:
            if conn is not None:
                conn.close()
        if problem is not None:
            for absolute, given in shown[got:]:
                record = error_record(given, f"{given}: not scanned: the deepscan service at {door} failed: {problem}; "
                                             "scan it again", settings=_settings_of(req, info), model=info["model"],
                                      detector=info["detector"])
                sink(record, row_of(record))
                advance()
            say(f"deepscan: the service at {door}: {problem}; {len(shown) - got} input(s) recorded as errors")
    return outcome


def _message(resp) -> str:
    try:
        return str(json.loads(resp.read()).get("error"))
    except (ValueError, AttributeError, OSError):
        return "no reason given"


def _as_given(record: dict, absolute: str, given: str) -> dict:
    """A record under the path as the user typed it (the service opened its absolute form)."""
    from ..errors import printable

    if absolute == given:
        return record
    for sent in (absolute, printable(absolute)):  # (a name that is not UTF-8 comes back escaped)
        if record.get("path") == sent:
            record["path"] = given
            error = record.get("error")
            if isinstance(error, str) and error.startswith(sent):
                record["error"] = given + error[len(sent):]
            break
    return record


def _settings_of(req, info: dict):
    """The service's settings as a ScanSettings (what its records carry)."""
    import dataclasses

    s = info["settings"]
    return dataclasses.replace(req.settings, clips=s["clips"], threshold=s["threshold"],
                               aggregation=s["aggregation"], min_face=s["min_face"])
