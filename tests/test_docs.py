"""Every ```python block in README.md and docs/*.md runs (a sample that rots fails CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def samples():
    for path in DOCS:
        for i, match in enumerate(BLOCK.finditer(path.read_text())):
            code = match.group(1)
            # Signature listings (`name(...) -> None`) document, they do not run.
            if re.search(r"\)\s*->", code):
                continue
            yield pytest.param(code, id=f"{path.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(samples()))
def test_doc_sample_runs(code):
    exec(compile(code, "<doc sample>", "exec"), {"__name__": "__doc_sample__"})
