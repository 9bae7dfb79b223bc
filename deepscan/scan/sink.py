"""The sink: where a scan's records go. JSON Lines on stdout (``--json``), the ``--output``
file (``output.JsonlFile``), the summary table's rows (``assemble.row_of``) and what the HTML
report needs of each record (``html_report.compact``). Local scans and Ray scans alike.
"""

from __future__ import annotations

from collections import Counter

from ..html_report import compact
from ..output import JsonlFile, emit_json, silence_stdout, stdout_failed
from .assemble import Row, row_of


class OutputClosed(Exception):
    """Standard output went away (``| head -1``) and no --output file takes the records."""


class ScanSink:
    """Where a scan's records go: JSON Lines on stdout (``--json``), an ``--output`` file, and
    one small row per video for the final table. A closed stdout (broken pipe) stops the scan
    unless a file still takes the records; the exit code stays the one the results earned."""

    def __init__(self, *, json_out: bool, file: JsonlFile | None, keep_rows: bool, on_error=None,
                 keep_items: bool = False):
        self.json_out, self.file, self.keep_rows, self.on_error = json_out, file, keep_rows, on_error
        self.rows: list = []
        self.keep_items = keep_items  # --report: what the page needs of each record (html_report.compact)
        self.items: list = []
        self.stdout_closed = False
        self.verdicts: Counter = Counter()

    def __call__(self, record: dict, row: Row | None = None) -> None:
        self.verdicts[record["verdict"]] += 1
        if self.file is not None:
            self.file.write(record)
        if self.keep_rows:
            self.rows.append(row if row is not None else row_of(record))
        if self.keep_items:
            self.items.append(compact(record))
        if record.get("error") and not self.json_out and self.on_error:
            self.on_error(record["error"])
        if self.json_out and not self.stdout_closed:
            try:
                emit_json(record)
            except BrokenPipeError:
                self.stdout_closed = True
                silence_stdout()
                if self.file is None:
                    raise OutputClosed from None
            except OSError as exc:
                raise stdout_failed(exc) from None
