"""``deepscan serve``: the doors and the lifecycle. One uvicorn server listens on a Unix socket
(mode 0600: only the user who started it) and, with ``--http PORT``, on 127.0.0.1 (another host
needs ``--host`` and a token). SIGTERM, SIGINT and ``serve --stop`` drain: no new connections,
the requests in flight get all their records, then the workers stop and the socket goes."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from .client import Door, default_socket, private_folder

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its NUL


@dataclass(frozen=True)
class Doors:
    socket: Path
    http_port: int | None = None
    host: str = "127.0.0.1"
    token: str | None = None
    max_upload: int = 4 << 30

    def check(self) -> None:
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise ConfigError(f"--socket {self.socket}: a socket path is at most {MAX_SOCKET_PATH} bytes; "
                              "choose a shorter one")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"--http {self.http_port}: a port is 0-65535")
        if not _loopback(self.host):
            if self.http_port is None:
                raise ConfigError("--host needs --http PORT (the Unix socket has no host)")
            if not self.token:
                raise ConfigError(f"--host {self.host} opens the service to other machines: it needs a token "
                                  "(--token-file FILE, or DEEPSCAN_TOKEN in the environment)")
            if len(self.token) < 16:
                raise ConfigError("the token must be at least 16 characters (e.g. `openssl rand -hex 16`)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start (bound under umask 0177). A
    stale socket file of a service that died is replaced; a live service, or any other file,
    is an error."""
    if path.parent == default_socket().parent and not os.environ.get("XDG_RUNTIME_DIR"):
        private_folder(path.parent)
    if not path.parent.is_dir():
        raise ConfigError(f"--socket {path}: its folder {path.parent} does not exist")
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"--socket {path}: a file that is not a socket is there; choose another path")
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            probe.connect(str(path))
            probe.close()
            raise ConfigError(f"a deepscan service already listens at {path}; stop it with "
                              f"`deepscan serve --stop --socket {path}` or choose another --socket")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # a service that died left it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--socket {path}: cannot listen there ({exc.strerror})") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--http {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port") \
            from None
    sock.listen(128)
    return sock


def service_info(local, doors: Doors, tcp: socket.socket | None) -> dict:
    """What /v1/info says: enough for a client to know whether this service gives the records it
    would get from a local scan with its options."""
    from .. import __version__

    req, s = local.req, local.req.settings
    st = os.stat(local.ckpt)
    http = None
    if tcp is not None:
        host, port = tcp.getsockname()[:2]
        http = f"http://{host}:{port}"
    return {
        "schema": "deepscan.service/1",
        "version": __version__,
        "pid": os.getpid(),
        "model": local.model_rec,
        "checkpoint": {"path": os.path.realpath(local.ckpt), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "default": req.weights is None, "variant": req.variant},
        "detector": local.spec.name,
        "settings": {"clips": s.clips, "threshold": s.threshold, "aggregation": s.aggregation,
                     "min_face": s.min_face, "hash_files": s.hash_files, "timeout_s": s.timeout_s,
                     "batch_size": s.batch_size, "margin": s.margin, "alignment": s.alignment,
                     "preparation": s.preparation, "decoder": s.decoder},
        "runtime": {"device": ",".join(str(d) for d in local.devices), "precision": local.precision,
                    "backend": local.backend, "workers": local.workers, "compile": bool(req.compile)},
        "doors": {"socket": str(doors.socket), "http": http, "token": doors.token is not None},
    }


UPLOADS = "deepscan-uploads-"  # + the service's pid: a folder of uploads in flight, in the temp folder


def sweep_uploads(folder: Path | None = None) -> list[Path]:
    """Remove the upload folders of this user's services that no longer run (killed mid-upload:
    a drained one removes its own); returns what went."""
    gone = []
    root = Path(folder or tempfile.gettempdir())
    for entry in root.glob(f"{UPLOADS}*-*"):
        pid = entry.name[len(UPLOADS):].split("-", 1)[0]
        try:
            st = entry.lstat()
        except OSError:
            continue
        if not pid.isdigit() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that service still runs (or its pid went to another user's process: kept)
        except PermissionError:
            continue
        except (ProcessLookupError, OverflowError):  # gone, or no pid at all
            pass
        shutil.rmtree(entry, ignore_errors=True)
        gone.append(entry)
    return gone


def serve(req, doors: Doors, say: Callable[[str], None]) -> int:
    """Load, listen, serve until stopped; returns the exit status (0 after a drain)."""
    import uvicorn

    from ..scan.run import open_local
    from .app import make_app
    from .engine import Engine

    doors.check()
    unix = bind_unix(doors.socket)  # first: a second service fails before loading anything
    tcp = None
    uploads = None
    engine = None
    try:
        tcp = bind_tcp(doors.host, doors.http_port) if doors.http_port is not None else None
        sweep_uploads()
        uploads = Path(tempfile.mkdtemp(prefix=f"{UPLOADS}{os.getpid()}-"))
        local = open_local(req, say)
        engine = Engine(local, say)
        for r in local.runners:  # ready means ready: an OpenVINO start compiling in its thread is waited for
            if hasattr(r, "ready"):
                r.ready()
        info = service_info(local, doors, tcp)
        def stop() -> None:  # /v1/shutdown: as SIGTERM, a drain
            server.should_exit = True

        app = make_app(engine, info, token=doors.token, max_upload=doors.max_upload, upload_dir=uploads,
                       on_shutdown=stop)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        where = f"{doors.socket}" + (f" and {info['doors']['http']}" if tcp is not None else "")
        say(f"deepscan serve: ready on {where} ({local.model_rec['name']}, {local.backend} on "
            f"{info['runtime']['device']}, {local.workers} worker(s)); stop with `deepscan serve --stop` or SIGTERM")
        with _signals_after_uvicorn():
            server.run(sockets=[unix] + ([tcp] if tcp is not None else []))
        say(f"deepscan serve: stopped after {engine.scanned} record(s)")
        return 0
    finally:
        if engine is not None:
            engine.close()
        for sock in (unix, tcp):
            if sock is not None:
                sock.close()
        with contextlib.suppress(FileNotFoundError):
            doors.socket.unlink()
        if uploads is not None:
            shutil.rmtree(uploads, ignore_errors=True)


@contextlib.contextmanager
def _signals_after_uvicorn():
    """uvicorn handles SIGINT/SIGTERM while it serves (a graceful drain), then raises the signal
    again with the handlers it found: these note it, so the drain ends in a normal exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, f: seen.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(door: Door, timeout: float = 60.0, say=print) -> int:
    """Ask the service at ``door`` to drain and stop; wait (up to ``timeout``) until it is gone."""
    import time

    from .client import why_not

    if door.socket is None:
        raise ConfigError("serve --stop goes through the service's Unix socket; pass --socket PATH, not a URL")
    try:
        conn, resp = door.request("POST", "/v1/shutdown", b"{}")
        conn.close()
    except OSError as exc:
        say(f"no deepscan service at {door} ({why_not(exc)})")
        return 1
    if resp.status != 202:
        say(f"the service at {door} refused to stop ({resp.status})")
        return 1
    deadline = time.monotonic() + timeout
    while os.path.exists(door.socket) and time.monotonic() < deadline:
        time.sleep(0.1)
    if os.path.exists(door.socket):
        say(f"the service at {door} is still draining after {timeout:.0f} s")
        return 1
    say(f"stopped the deepscan service at {door}")
    return 0
