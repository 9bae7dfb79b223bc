"""The service's HTTP API (Starlette), the same on both doors (docs/service.md):

    GET  /v1/health    {"ready": true, "open": requests, "waiting": inputs, "scanned": records}
    GET  /v1/info      the model, checkpoint, detector, settings and runtime it scans with
    POST /v1/scan      JSON {"paths": [...]} (absolute paths, files or folders) or a video as the
                       body (any other Content-Type; ``?name=`` names it in its record): the
                       records, as ``deepscan scan --json`` writes them, streamed as JSON Lines
    POST /v1/shutdown  drain and stop (the Unix socket only)

On the TCP door a token, when set, is required as ``Authorization: Bearer TOKEN``. Every error
is JSON ``{"error": "..."}`` with a 4xx status, for that request alone.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..output import json_line
from ..scan.plan import ScanInput, walk
from .engine import Engine

MAX_JSON = 16 << 20  # a request's JSON body: ~100,000 paths
MAX_INPUTS = 100_000
# a client that stalls while sending its body gets 408 (DEEPSCAN_BODY_TIMEOUT_S: for tests, or slow links)
BODY_TIMEOUT_S = float(os.environ.get("DEEPSCAN_BODY_TIMEOUT_S") or 30.0)
NDJSON = "application/x-ndjson"


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def unix_door(request: Request) -> bool:
    """Whether the request came through the Unix socket (uvicorn gives its server as (path, None))."""
    server = request.scope.get("server")
    return bool(server) and server[1] is None


def inputs_of(body: dict, walk_folders=walk) -> list[ScanInput]:
    """The inputs a JSON request names: ``paths`` (absolute; folders walked as ``scan`` walks
    them) or ``inputs`` ([{"path", "key", "error"}], as ``deepscan scan --server`` sends its
    planned inputs). A relative path becomes an error record, not a guess at a working folder."""
    if not isinstance(body, dict) or ("paths" in body) == ("inputs" in body):
        raise BadRequest(400, 'send a JSON object with "paths": ["/absolute/video.mp4", ...]')
    items = body.get("paths", body.get("inputs"))
    if not isinstance(items, list) or not items:
        raise BadRequest(400, '"paths" must be a non-empty list of absolute paths')
    if len(items) > MAX_INPUTS:
        raise BadRequest(413, f"{len(items)} inputs in one request; send at most {MAX_INPUTS}")
    out: list[ScanInput] = []
    for item in items:
        if "inputs" in body:
            if not (isinstance(item, dict) and isinstance(item.get("path"), str)
                    and isinstance(item.get("key", ""), str) and isinstance(item.get("error") or "", str)):
                raise BadRequest(400, 'each of "inputs" must be {"path": str, "key": str, "error": str or null}')
            path, key, error = item["path"], item.get("key") or Path(item["path"]).name, item.get("error")
        elif isinstance(item, str):
            path, key, error = item, Path(item).name, None
        else:
            raise BadRequest(400, '"paths" must hold strings (absolute paths)')
        if "\x00" in path or not path:
            raise BadRequest(400, "a path is empty or holds a NUL character")
        if not os.path.isabs(path):
            out.append(ScanInput(path, key, f"{path}: a relative path; the service cannot know the client's "
                                            "working folder: send an absolute path"))
        elif error is None and "paths" in body and os.path.isdir(path):
            out.extend(walk_folders([path]))
        else:
            out.append(ScanInput(path, key, error))
        if len(out) > MAX_INPUTS:
            raise BadRequest(413, f"more than {MAX_INPUTS} inputs in one request; send fewer")
    return out


def make_app(engine: Engine, info: dict, *, token: str | None = None, max_upload: int = 4 << 30,
             upload_dir: Path | None = None, on_shutdown: Callable[[], None] | None = None) -> Starlette:
    upload_dir = Path(upload_dir or tempfile.gettempdir())

    def denied(request: Request) -> JSONResponse | None:
        if token is None or unix_door(request):
            return None
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return _error(401, "this door needs its token: send Authorization: Bearer TOKEN")
        return None

    async def health(request: Request):
        if (refused := denied(request)) is not None:
            return refused
        return JSONResponse({"ready": True, "open": engine.busy, "waiting": engine.feed.waiting,
                             "scanned": engine.scanned})

    async def describe(request: Request):
        return denied(request) or JSONResponse(info)

    async def shutdown(request: Request):
        if not unix_door(request):
            return _error(403, "the service is stopped through its Unix socket (deepscan serve --stop)")
        if on_shutdown is not None:
            on_shutdown()
        return JSONResponse({"stopping": True}, status_code=202)

    async def scan(request: Request):
        if (refused := denied(request)) is not None:
            return refused
        upload = None
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "application/json":
                body = json.loads(await _body(request, MAX_JSON))
                expect = body.get("expect") if isinstance(body, dict) else None
                if expect is not None and not _matches(expect, info):
                    return _error(409, "the service runs another checkpoint or other settings than expected")
                inputs = await asyncio.to_thread(inputs_of, body)  # (a folder's walk: off the event loop)
            else:
                upload = await _receive(request, max_upload, upload_dir)
                name = request.query_params.get("name") or "upload"
                inputs = [ScanInput(str(upload), name)]
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except (ValueError, RecursionError):
            return _error(400, "the body is not valid JSON; send {\"paths\": [\"/absolute/video.mp4\"]}")
        except ClientDisconnect:
            return _error(400, "the client went away while sending")
        return _stream(engine, inputs, upload, request.query_params.get("name"))

    return Starlette(routes=[Route("/v1/health", health), Route("/v1/info", describe),
                             Route("/v1/scan", scan, methods=["POST"]),
                             Route("/v1/shutdown", shutdown, methods=["POST"])])


def _matches(expect, info: dict) -> bool:
    """A client's ``expect`` ({"sha256", "settings"}) against what the service runs."""
    if not isinstance(expect, dict):
        return False
    if expect.get("sha256") not in (None, info["model"]["sha256"]):
        return False
    return all(info["settings"].get(k) == v for k, v in (expect.get("settings") or {}).items())


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body is {int(declared)} bytes; at most {limit} are taken")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"the body is over {limit} bytes; send less")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BadRequest(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    return b"".join(chunks)


async def _receive(request: Request, limit: int, folder: Path) -> Path:
    """An uploaded video, written to a private temporary file (deleted after its record, or at
    once when anything goes wrong)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the upload is {int(declared)} bytes; this service takes at most {limit} "
                              "(deepscan serve --max-upload)")
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".video", dir=folder)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            stream = request.stream().__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), BODY_TIMEOUT_S)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise BadRequest(408, f"the upload stalled for {BODY_TIMEOUT_S:.0f} s") from None
                size += len(chunk)
                if size > limit:
                    raise BadRequest(413, f"the upload is over {limit} bytes (deepscan serve --max-upload)")
                f.write(chunk)
        if size == 0:
            raise BadRequest(400, "the upload is empty; send the video as the body")
        return Path(name)
    except BaseException:
        os.unlink(name)
        raise


def _stream(engine: Engine, inputs: list[ScanInput], upload: Path | None, name: str | None) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(record):  # (the scanning thread)
        loop.call_soon_threadsafe(queue.put_nowait, record)

    def forget_upload():
        if upload is not None:
            try:
                upload.unlink()
            except FileNotFoundError:
                pass

    req = engine.submit(inputs, deliver, on_done=forget_upload)

    async def lines():
        finished = False
        try:
            while (record := await queue.get()) is not None:
                if upload is not None:
                    record = _as_upload(record, str(upload), name or "upload")
                yield json_line(record) + "\n"
            finished = True
        finally:
            if not finished:  # the client went away: its inputs only are cancelled
                engine.cancel(req)

    return StreamingResponse(lines(), media_type=NDJSON)


def _as_upload(record: dict, temp: str, name: str) -> dict:
    """An upload's record under the name the client gave, not the temporary file's."""
    record = dict(record, path=name)
    if isinstance(record.get("error"), str):
        record["error"] = record["error"].replace(temp, name)
    return record
