"""The documentation and the code's shape: docs/cli.md is what the CLI generates, every link
resolves, the README is a front page starting with the two commands CI runs, the import contracts
hold (import-linter), and neither the CLI nor a worker imports torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI_DOCS = [sys.executable, "-m", "typer", "deepscan.cli", "utils", "docs", "--name", "deepscan",
            "--title", "deepscan command-line reference"]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings, and its explicit <a id=...>."""
    text = page.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # comments in code blocks are no headings
    out = {m.group(1) for m in re.finditer(r'<a id="([^"]+)"></a>', text)}
    for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_cli_reference_is_what_the_cli_generates(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([*CLI_DOCS, "--output", str(out)], check=True, capture_output=True, timeout=120, cwd=ROOT)
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: regenerate it (CONTRIBUTING.md, CI)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: links that go nowhere: {broken}"


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    first, second = re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)[:2]
    assert first.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[test]'")
    assert second == ".venv/bin/python -m pytest -q"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith(second)  # CI runs the README's command
    for page in PAGES:  # no test counts that a change would have to keep in step
        assert not re.search(r"\b\d+ tests\b", page.read_text()), page.name


def test_import_contracts_hold():
    """The scan's stages import only downward, the workers import no torch, no import circles
    (``.importlinter``): what breaks one fails here, in CI."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("module", ["deepscan.cli", "deepscan.scan", "deepscan.scan.workers"])
def test_the_cli_and_the_workers_import_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'timm', 'openvino') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
