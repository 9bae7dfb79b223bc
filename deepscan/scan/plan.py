"""The plan stage of a scan: which inputs, in which order, in which shard, and which are done.

Nothing here reads a video. Folders are walked lazily (sorted, links to folders not followed),
so the first result of a huge tree appears before the walk ends.

- ``--shard K/N``: an input belongs to shard ``1 + h(key) mod N``, where ``key`` is its path
  relative to the folder argument it was found in (or a file argument's name), and ``h`` the
  first 8 bytes of its SHA-256. The same tree gives the same partition on every machine and in
  every run, whatever the folder is mounted as, so N tasks of a job array cover it exactly once.
- ``--resume``: an input is done when the output file's last record for its path is a final
  verdict made with the same settings, and the file is unchanged (see ``ResumeIndex``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ConfigError
from ..config import VIDEO_EXTENSIONS


def _sidecar(name: str) -> bool:
    """macOS's AppleDouble files (``._clip.mp4``): metadata beside a file copied from a Mac, not video."""
    return name.startswith("._")


@dataclass(frozen=True)
class ScanInput:
    path: str  # as the user gave it, or found under a folder they gave
    key: str  # relative to the argument it came from: what shards are computed from
    error: str | None = None  # known before any reading (e.g. a folder without videos)


def walk(args: Iterable[str | os.PathLike], pattern: str | None = None) -> Iterator[ScanInput]:
    """Files as given; folders searched recursively for videos (by extension, or ``pattern``).
    A folder that cannot be read gives an input whose ``error`` names it (never a silent gap)."""
    if pattern is not None and not pattern.strip():
        raise ConfigError("--glob needs a pattern such as '*.mp4' (it was empty)")
    for raw in args:
        p = Path(raw)
        if not p.is_dir():
            yield ScanInput(os.fspath(raw), p.name or os.fspath(raw))
            continue
        found = False
        unreadable: list[OSError] = []
        reported: list[OSError] = []

        def failures() -> Iterator[ScanInput]:
            while unreadable:
                exc = unreadable.pop(0)
                reported.append(exc)
                where = Path(exc.filename) if exc.filename else p
                try:
                    key = where.relative_to(p).as_posix()
                except ValueError:
                    key = where.name
                why = exc.strerror or type(exc).__name__
                yield ScanInput(str(where), key if key != "." else (p.name or str(p)),
                                f"{where}: cannot read this folder ({why}); its videos were not scanned; "
                                "fix its permissions and scan it again")

        for root, dirs, files in os.walk(p, followlinks=False, onerror=unreadable.append):
            yield from failures()
            dirs.sort()
            for name in sorted(files):
                if _sidecar(name):
                    continue
                f = Path(root, name)
                if f.match(pattern) if pattern else f.suffix.lower() in VIDEO_EXTENSIONS:
                    found = True
                    yield ScanInput(str(f), f.relative_to(p).as_posix())
        yield from failures()
        if not found and not reported:  # (an unreadable folder says more than "no videos")
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


FINAL_VERDICTS = ("fake", "real", "no-face")


def settings_key(record: dict) -> tuple:
    """What must be equal for a record to stand for a scan with other settings: the checkpoint
    (its sha256), threshold, aggregation, detector and the sampling settings."""
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    return (model.get("sha256"), record.get("threshold"), record.get("aggregation"), record.get("detector"),
            json.dumps(record.get("settings"), sort_keys=True))


class ResumeIndex:
    """What ``--resume`` needs of an output file, and nothing more (never whole records): for
    every path, whether its last record is a final verdict, the file's size, mtime and sha256
    then, and which settings made it.

    An input is done when its path's last record is final (``fake``, ``real``, ``no-face``; an
    ``error`` is tried again), was made with the same settings (``settings_key``), and the file
    is unchanged: same size and mtime, or same content (sha256; hashed only when the size is
    the same). Every path gets its own record: a copy of a done file under another name is
    scanned."""

    def __init__(self, records: Iterable[dict] = ()):
        self._keys: dict[tuple, int] = {}  # settings -> small id (most files hold one)
        self.last: dict[str, tuple] = {}  # path -> (final, size, mtime_ns, sha256, settings id)
        self.count = 0
        for r in records:
            self.add(r)

    def add(self, r: dict) -> None:
        path = r.get("path")
        if not isinstance(path, str):
            return
        self.count += 1
        f = r.get("file") if isinstance(r.get("file"), dict) else {}
        size, mtime = f.get("size"), f.get("mtime_ns")
        sha = r.get("sha256") if isinstance(r.get("sha256"), str) else None
        key = self._keys.setdefault(settings_key(r), len(self._keys))
        self.last[os.path.normpath(path)] = (r.get("verdict") in FINAL_VERDICTS,
                                             size if isinstance(size, int) else None,
                                             mtime if isinstance(mtime, int) else None, sha, key)

    def other_settings(self, key: tuple) -> int:
        """Paths whose last record is final but was made with settings other than ``key``."""
        want = self._keys.get(key)
        return sum(1 for e in self.last.values() if e[0] and e[4] != want)

    def retried(self) -> int:
        """Paths whose last record is an error (they are scanned again)."""
        return sum(1 for e in self.last.values() if not e[0])

    def done(self, inp: ScanInput, key: tuple) -> bool:
        from ..output import printable

        entry = self.last.get(printable(os.path.normpath(inp.path)))  # as records hold it
        if entry is None or not entry[0] or self._keys.get(key) != entry[4]:
            return False
        try:
            st = os.stat(inp.path)
        except OSError:
            return False  # gone or unreadable now: scanned again, and its error recorded
        if (st.st_size, st.st_mtime_ns) == (entry[1], entry[2]):
            return True
        if entry[3] and st.st_size == entry[1]:  # touched, maybe unchanged
            from ..hashing import sha256_file

            try:
                return sha256_file(inp.path) == entry[3]
            except OSError:
                return False
        return False

    def pending(self, inputs: Iterable[ScanInput], key: tuple) -> Iterator[ScanInput]:
        return (i for i in inputs if not self.done(i, key))


# ---------------------------------------------------------------------------- a request's inputs
def open_output(req):
    """The --output file (checked before anything is scanned) and, with --resume, the index of
    what it holds."""
    from ..output import JsonlFile, printable

    if req.output is None:
        return None, None
    for p in req.paths:
        try:
            if os.path.isfile(p) and os.path.exists(req.output) and os.path.samefile(p, req.output):
                raise ConfigError(f"--output {printable(str(req.output))} is one of the inputs; give another file")
        except OSError:
            pass
    done = ResumeIndex() if req.resume else None
    return JsonlFile(req.output, on_record=done.add if done is not None else None), done


def resume_key(req, model_rec: dict, detector: str) -> tuple:
    s = req.settings
    return settings_key({"model": model_rec, "threshold": s.threshold, "aggregation": s.aggregation,
                         "detector": detector, "settings": s.record()})


def plan_inputs(req, file, done, key: tuple, say):
    """The inputs of ``req``: walked lazily, sharded, and without those ``done`` has (--resume)."""
    from ..output import printable

    out = printable(str(req.output))
    if file is not None and file.dropped:
        say(f"note: dropped a torn last line ({file.dropped} bytes) from {out}")
    if file is not None and file.damaged:
        say(f"note: {file.damaged} damaged line(s) in {out} ignored")
    inputs = in_shard(walk(req.paths, req.glob), *req.shard)
    if done is not None:
        say(f"resuming: {done.count} record(s) of {len(done.last)} path(s) in {out}; inputs whose last record is a "
            "final verdict are skipped")
        if done.retried():
            say(f"resuming: {done.retried()} path(s) whose last record is an error are scanned again")
        other = done.other_settings(key)
        if other:
            say(f"resuming: {other} path(s) were scanned with other settings (checkpoint, threshold, aggregation, "
                f"detector, --clips or --min-face) and are scanned again; readers take the last record per path")
        inputs = done.pending(inputs, key)
    return inputs
