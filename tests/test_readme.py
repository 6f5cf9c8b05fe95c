"""README.md's three commands stay true: the two make targets exist, the documented pip line is the one they run,
and CI runs the same test command a newcomer pastes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_quick_start_is_make_demo_make_test_and_the_makefile_runs_the_documented_setup():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    demo, test, setup = _bash_blocks(quick_start)
    assert (demo, test) == ("make demo", "make test")
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, flags=re.M))
    assert {"demo", "test"} <= targets
    pins = re.search(r"^TORCH_PINS = (.+)$", makefile, flags=re.M).group(1)
    venv_line = f'python3 -m venv .venv && .venv/bin/pip install {pins} -e ".[dev]"'
    assert setup == venv_line, "README's pip line and the Makefile's pins disagree"
    assert '$(VENV)/bin/pip install -q $(TORCH_PINS) -e ".[dev]"' in makefile


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
