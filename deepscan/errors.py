"""Errors meant for people: each carries a one-line message and the CLI exit code."""

from __future__ import annotations

import errno
import unicodedata

# a write refused for want of room: a full disk, a file-size limit (ulimit -f), a quota
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DeepscanError(Exception):
    """A failure the user can act on. The message names the file and what to do."""

    exit_code = 2


class ConfigError(DeepscanError, ValueError):
    """An impossible model or run configuration."""


class MediaError(DeepscanError):
    """A video that cannot be read or used."""


class WeightsError(DeepscanError):
    """A checkpoint or detector file that is missing, corrupt or refused."""


class OutputError(DeepscanError):
    """Writing results failed (a full disk, an unwritable file): the run ends with exit code 2."""


def io_reason(exc: BaseException, where=None) -> str:
    """The operating system's words for a failed write. Libraries that write for us do not all
    raise OSError with them: numpy's short write says "N requested and M written", safetensors
    wraps "No space left on device (os error 28)", OpenVINO's writer "basic_ios::clear". Near-empty
    free space at ``where`` is named as the reason it most likely is."""
    import re
    import shutil

    why = getattr(exc, "strerror", None)
    if why:
        return why
    text = str(exc)
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    if m:
        return m.group(1)
    short = re.search(r"\d+ requested and \d+ written", text) is not None
    if where is not None:
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        if free is not None and free < 64 * 2**20:
            return f"No space left on device: {free / 2**20:.1f} MB free"
    if short:
        return "the disk took only part of a write: it is full, or a file-size limit (ulimit -f) was reached"
    return text or type(exc).__name__


def show_warnings_escaped() -> None:
    """Library warnings (matplotlib's "Glyph 27 ... missing" quotes a file name's raw ESC) reach
    stderr as one line through ``shown``, like every other message, in the scanning process
    and in the preparation workers: nothing a library says can act on the terminal."""
    import sys
    import warnings

    def showwarning(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"warning: {shown(str(message))} ({category.__name__})\n")

    warnings.showwarning = showwarning


def cache_home():
    """deepscan's own cache folder ($XDG_CACHE_HOME/deepscan, else ~/.cache/deepscan): BlazeFace's
    ONNX export, OpenVINO's converted models, converted published checkpoints."""
    import os
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepscan"


# ---------------------------------------------------------------------------- text for people
def printable(text: str) -> str:
    """A string that any terminal encoding can print: bytes of non-UTF-8 file names (held as
    lone surrogates by Python) become \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HIDDEN = ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")  # controls, format (bidi, zero-width), separators...


def shown(text: str) -> str:
    """``text`` as it may reach a person's terminal: every character a terminal would act on
    rather than show (escape sequences, bell, newline, bidi overrides, zero-width characters,
    line separators) becomes visible text (``\\x1b``, ``\\n``, ``\\u202e``), as do the bytes of
    non-UTF-8 names. A file name can then neither erase a row, clear the screen, set the
    title, spoof its own name nor split a one-line error. JSON output is not shown: it keeps
    the real names (JSON escapes controls itself)."""
    text = printable(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or unicodedata.category(ch) not in _HIDDEN:
            out.append(ch)  # (isprintable() is also False for harmless spaces such as U+00A0)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)
