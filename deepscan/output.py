"""One output abstraction: results to stdout (a rich table or JSON), everything else to stderr.

NO_COLOR and non-TTY streams are honoured by rich itself; ``quiet`` (set by --json) also turns
progress bars off so that scripts see nothing but their JSON.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def stdout_console() -> Console:
    return Console(file=sys.stdout, soft_wrap=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, stderr=True, soft_wrap=False)


def emit_json(obj) -> None:
    """One JSON document on its own line of stdout, flushed at once (JSON Lines)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n")
    sys.stdout.flush()


def notice(message: str) -> None:
    """A one-line remark for people, on stderr."""
    stderr_console().print(message, markup=False, highlight=False, soft_wrap=True)


def warn_untrained(where: str) -> None:
    stderr_console().print(
        f"[bold red]WARNING: {where} is an UNTRAINED checkpoint: its scores are random and mean nothing.[/]",
        highlight=False, soft_wrap=True,
    )


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
