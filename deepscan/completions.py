"""Shell completion scripts for bash, zsh and fish, generated from the CLI itself.

``python -m deepscan.completions completions/`` rewrites the files in completions/; a test
fails when they are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "deepscan.bash", "zsh": "_deepscan", "fish": "deepscan.fish"}


def script(shell: str) -> str:
    """What `deepscan --show-completion` prints in ``shell``: typer's script for this program."""
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="deepscan", complete_var="_DEEPSCAN_COMPLETE", shell=shell) + "\n"


def write_all(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(script(shell), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else "completions"):
        print(p)
