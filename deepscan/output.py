"""One output abstraction: results to stdout (a rich table or JSON), everything else to stderr.

NO_COLOR and non-TTY streams are honoured by rich itself; ``quiet`` (set by --json) also turns
progress bars off so that scripts see nothing but their JSON.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from contextlib import contextmanager

from rich.console import Console

from .errors import OutputError, printable, shown  # noqa: F401 - printable, shown: output.printable, output.shown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def stdout_console() -> Console:
    return Console(file=_Stdout(), soft_wrap=False)


class _Stdout:
    """Standard output for rich's tables: a reader that went away (``| head``) ends the output
    quietly; a stream that cannot take it (a full disk) is one line, not a traceback."""

    def write(self, text: str) -> int:
        return self._guard(sys.stdout.write, text)

    def flush(self) -> None:
        self._guard(sys.stdout.flush)

    def __getattr__(self, name):  # isatty, encoding, fileno...: rich asks the real stream
        return getattr(sys.stdout, name)

    @staticmethod
    def _guard(fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            silence_stdout()
            return 0
        except OSError as exc:
            silence_stdout()  # Python's final flush would fail again
            raise stdout_failed(exc) from None


def stdout_failed(exc: OSError) -> OutputError:
    return OutputError(f"standard output: writing failed ({exc.strerror or exc}); write results with --output FILE "
                       "instead")


def stderr_console() -> Console:
    return Console(file=sys.stderr, stderr=True, soft_wrap=False)


def finite(obj):
    """``obj`` made fit for strict JSON: every non-finite float (NaN, inf) becomes None (JSON has
    no NaN, and a bare ``NaN`` makes a line invalid for strict parsers), and the bytes of
    non-UTF-8 file names (lone surrogates in Python strings) become visible ``\\xNN`` text."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return printable(obj)
    if isinstance(obj, dict):
        return {finite(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_line(obj) -> str:
    """One line of strict JSON, valid UTF-8 (see ``finite``)."""
    return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False)


def emit_json(obj) -> None:
    """One JSON document on its own line of stdout, flushed at once (JSON Lines)."""
    sys.stdout.write(json_line(obj) + "\n")
    sys.stdout.flush()


def notice(message: str) -> None:
    """A one-line remark for people, on stderr (file names in it shown escaped: ``shown``)."""
    stderr_console().print(shown(message), markup=False, highlight=False, soft_wrap=True)


def warn_untrained(where: str) -> None:
    from rich.text import Text

    # Text, not markup: a file name may hold square brackets ("clip [1080p].mp4")
    stderr_console().print(
        Text(f"WARNING: {shown(where)} is an UNTRAINED checkpoint: its scores are random and mean nothing.",
             style="bold red"),
        highlight=False, soft_wrap=True,
    )


RECORD_PREFIX = b'{"schema": "deepscan.scan/'  # how every record line of an --output file begins


def _begins_record(data: bytes) -> bool:
    """``data`` is the start of a record line (or all that a crash left of one)."""
    return data.startswith(RECORD_PREFIX) or RECORD_PREFIX.startswith(data)


def _is_record(obj) -> bool:
    return isinstance(obj, dict) and str(obj.get("schema", "")).startswith("deepscan.scan/")


def _lock_holder(fd: int) -> int | None:
    """The process holding a flock on ``fd``'s file, from /proc/locks (Linux), else None."""
    try:
        st = os.fstat(fd)
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and ident in parts:
                    pid = parts[parts.index(ident) - 1]
                    if pid.isdigit():
                        return int(pid)
    except (OSError, ValueError, IndexError):
        pass
    return None


class JsonlFile:
    """``--output FILE``: JSON Lines appended one complete line at a time (one write call per
    record on an O_APPEND descriptor, so a crash leaves at most one torn line, at the end).

    A regular file is read first, as a stream (``on_record`` gets each complete record, for
    --resume): it must be empty or hold this tool's records, else it is refused before anything
    is scanned (a video, a text file: never touched). A torn last line is cut; a complete last
    line without its newline is kept, and the newline added before the next record. Pipes,
    FIFOs, character devices and anything under /dev or /proc (``/dev/stdout``, ``>(gzip)``)
    are streams: appended to, never read, truncated or sought; a FIFO that no process reads is
    refused at once rather than waited on forever."""

    def __init__(self, path: str | os.PathLike, *, on_record=None):
        import stat
        from pathlib import Path

        self.path = Path(path)
        self.dropped = 0  # bytes of a torn last line that were cut
        self.damaged = 0  # lines in the middle that are not records (ignored)
        self._newline = False  # the last record lacks its newline: add it before appending
        self.stream = False
        shown = printable(str(self.path))
        try:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise OutputError(f"--output {shown} is a folder; give a file name")
            device_path = str(self.path).startswith(("/dev/", "/proc/"))
            if st is not None and (device_path or not stat.S_ISREG(st.st_mode)):
                self.stream = True
                flags = os.O_WRONLY | os.O_APPEND | (os.O_NONBLOCK if stat.S_ISFIFO(st.st_mode) else 0)
                try:
                    self.fd = os.open(self.path, flags)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        raise OutputError(f"--output {shown} is a FIFO that no process reads; start its reader "
                                          "first, or give a file") from None
                    raise
                os.set_blocking(self.fd, True)
                return
            if st is not None and st.st_size:
                self._check_ours(shown)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._lock(shown)  # before reading: nobody else appends while this scan reads, cuts or writes
            if os.fstat(self.fd).st_size:
                self._read(on_record, shown)
        except OSError as exc:
            raise OutputError(f"--output {shown}: cannot open it ({exc.strerror}); choose a writable file") from None

    def _lock(self, shown: str) -> None:
        """An exclusive lock on the file for the whole scan (flock: released whenever this
        process ends, however it ends): two scans appending to one file (a cron rerun with
        --resume while the last run still writes) would cut each other's records."""
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self.fd)
            os.close(self.fd)
            who = f"process {holder}" if holder else "another process"
            raise OutputError(f"--output {shown} is being written by {who} (another deepscan scan?); wait for it "
                              "to end, or give another file") from None
        except OSError:
            pass  # a file system without locks (some network mounts): as before

    def _check_ours(self, shown: str) -> None:
        with open(self.path, "rb") as f:
            if not _begins_record(f.read(len(RECORD_PREFIX))):
                raise OutputError(f"--output {shown}: exists and does not hold deepscan records; nothing was "
                                  "changed; give a new file name (or the output file of an earlier scan)")

    def _read(self, on_record, shown: str) -> None:
        refuse = OutputError(f"--output {shown}: exists and does not hold deepscan records; nothing was changed; "
                             "give a new file name (or the output file of an earlier scan)")
        seen = False
        end = 0  # byte length of the complete lines
        with open(self.path, "rb") as f:
            if not _begins_record(f.read(len(RECORD_PREFIX))):
                raise refuse  # checked before reading lines: a 40 GB video has no newline to stop at
            f.seek(0)
            for line in f:
                complete = line.endswith(b"\n")
                if not line.strip():
                    end += len(line) if complete else 0
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    rec = None
                if not _is_record(rec):
                    if not complete:
                        if not seen and not _begins_record(line):
                            raise refuse  # a single line, not ours
                        continue  # a torn last line: cut below
                    if not seen:
                        raise refuse  # the first line is not ours: not our file
                    self.damaged += 1  # a damaged line in the middle: ignored (its input is scanned again)
                    end += len(line)
                    continue
                seen = True
                if on_record is not None:
                    on_record(rec)
                end += len(line)
                self._newline = not complete
            read = f.tell()
        # cut the torn last line, and only it: never below what was read (the lock keeps other
        # deepscan scans out; a file that grew meanwhile is left as it is)
        if end < read and os.fstat(self.fd).st_size == read:
            os.ftruncate(self.fd, end)
            self.dropped = read - end

    def write(self, record: dict) -> None:
        line = (json_line(record) + "\n").encode("utf-8")
        if self._newline:
            line = b"\n" + line
        start = None if self.stream else os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view):]
            self._newline = False
        except OSError as exc:
            if start is not None:
                try:
                    os.ftruncate(self.fd, start)  # never leave a half-written record behind
                except OSError:
                    pass
            raise OutputError(f"--output {printable(str(self.path))}: writing failed ({exc.strerror}); "
                              "the records before this one are complete") from None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def debug_enabled() -> bool:
    return os.environ.get("DEEPSCAN_DEBUG", "") not in ("", "0")


@contextmanager
def progress(total: int, description: str, enabled: bool = True):
    """A progress bar on stderr; a no-op when disabled or stderr is not a terminal."""
    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield lambda advance=1, **_: None
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda advance=1, **kw: bar.update(task, advance=advance, **kw)


def write_lines(path, records) -> None:
    """JSON Lines into ``path``, atomically (a temporary file renamed into place)."""
    write_atomically(path, "".join(json_line(r) + "\n" for r in records))


def write_atomically(path, text: str, *, shared: bool = False) -> None:
    """``text`` into ``path``, whole or not at all (a temporary file renamed into place); a
    failure (a full disk) is one line naming the file. ``shared``: the file gets the mode a new
    file gets under the umask (a page to share), not the temporary file's 0600."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if shared:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: writing failed ({exc.strerror}); choose another place") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that Python's final flush of a closed pipe says nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass

