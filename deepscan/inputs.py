"""The plan stage of a scan: which inputs, in which order, in which shard, and which are done.

Nothing here reads a video. Folders are walked lazily (sorted, links to folders not followed),
so the first result of a huge tree appears before the walk ends.

- ``--shard K/N``: an input belongs to shard ``1 + h(key) mod N``, where ``key`` is its path
  relative to the folder argument it was found in (or a file argument's name), and ``h`` the
  first 8 bytes of its SHA-256. The same tree gives the same partition on every machine and in
  every run, whatever the folder is mounted as, so N tasks of a job array cover it exactly once.
- ``--resume``: an input is done when the output file already has a record for it: the same
  path with the same size and modification time, or the same content (SHA-256; files are
  hashed only when a record of the same size exists).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ConfigError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp",
                    # camera, disc and broadcast files
                    ".mts", ".m2ts", ".m2t", ".vob", ".mxf", ".ogv", ".3g2", ".f4v", ".asf", ".divx", ".y4m")


def _sidecar(name: str) -> bool:
    """macOS's AppleDouble files (``._clip.mp4``): metadata beside a file copied from a Mac, not video."""
    return name.startswith("._")


@dataclass(frozen=True)
class ScanInput:
    path: str  # as the user gave it, or found under a folder they gave
    key: str  # relative to the argument it came from: what shards are computed from
    error: str | None = None  # known before any reading (e.g. a folder without videos)


def walk(args: Iterable[str | os.PathLike], pattern: str | None = None) -> Iterator[ScanInput]:
    """Files as given; folders searched recursively for videos (by extension, or ``pattern``)."""
    if pattern is not None and not pattern.strip():
        raise ConfigError("--glob needs a pattern such as '*.mp4' (it was empty)")
    for raw in args:
        p = Path(raw)
        if not p.is_dir():
            yield ScanInput(os.fspath(raw), p.name or os.fspath(raw))
            continue
        found = False
        for root, dirs, files in os.walk(p, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                if _sidecar(name):
                    continue
                f = Path(root, name)
                if f.match(pattern) if pattern else f.suffix.lower() in VIDEO_EXTENSIONS:
                    found = True
                    yield ScanInput(str(f), f.relative_to(p).as_posix())
        if not found:
            what = f"matching {pattern!r}" if pattern else f"with a video extension ({', '.join(VIDEO_EXTENSIONS[:5])}, ...)"
            yield ScanInput(str(p), p.name or str(p), f"{p}: folder holds no files {what}; use --glob to choose others")


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (1-based) -> (K, N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like K/N (e.g. 3/8), not {text!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise ConfigError(f"--shard {text}: K must be between 1 and N, and N >= 1")
    return k, n


def shard_of(key: str, n: int) -> int:
    """The 1-based shard of an input key among ``n`` (stable: SHA-256 of the key's bytes)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % n


def in_shard(inputs: Iterable[ScanInput], k: int, n: int) -> Iterator[ScanInput]:
    return (i for i in inputs if n == 1 or shard_of(i.key, n) == k)


class ResumeIndex:
    """What an output file already holds: (path, size, mtime) and sha256 of every record."""

    def __init__(self, records: Iterable[dict]):
        self.stats: set[tuple[str, int, int]] = set()
        self.paths: set[str] = set()  # records without file stats (the input was unreadable)
        self.hashes: dict[int, set[str]] = {}  # size -> sha256s
        self.count = 0
        for r in records:
            path, f = r.get("path"), r.get("file")
            if not isinstance(path, str):
                continue
            self.count += 1
            if isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("mtime_ns"), int):
                self.stats.add((os.path.normpath(path), f["size"], f["mtime_ns"]))
                if isinstance(r.get("sha256"), str):
                    self.hashes.setdefault(f["size"], set()).add(r["sha256"])
            else:
                self.paths.add(os.path.normpath(path))

    def done(self, inp: ScanInput) -> bool:
        from .output import printable

        path = printable(os.path.normpath(inp.path))  # as records hold it (non-UTF-8 bytes escaped)
        try:
            st = os.stat(inp.path)
        except OSError:
            return path in self.paths  # still unreadable: its error record stands
        if (path, st.st_size, st.st_mtime_ns) in self.stats:
            return True
        same_size = self.hashes.get(st.st_size)
        if same_size:
            from .hashing import sha256_file

            try:
                return sha256_file(inp.path) in same_size
            except OSError:
                return False
        return False

    def pending(self, inputs: Iterable[ScanInput]) -> Iterator[ScanInput]:
        return (i for i in inputs if not self.done(i))


def read_records(path: Path) -> tuple[list[dict], int]:
    """The complete records of a JSON Lines file and the byte length they occupy: a torn last
    line (a crash while writing it) lies beyond that length."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    records = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a damaged line in the middle: ignored (its input is scanned again)
        if isinstance(rec, dict):
            records.append(rec)
    return records, end
