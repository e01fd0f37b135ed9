"""The README's "Use with diffusers" and "Use in your own model" snippets run as written (tiny shapes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets(heading: str) -> list[str]:
    """The ```python blocks of the README section ``## heading`` (up to the next ``## `` heading)."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.parametrize("heading", ["Use with diffusers", "Use in your own model"])
def test_readme_section_snippets_run(heading: str) -> None:
    if heading == "Use with diffusers":
        pytest.importorskip("diffusers")
    blocks = _snippets(heading)
    assert blocks, f"no python block under '## {heading}'"
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md:{heading}:{i}", "exec"), {"__name__": f"readme_{i}"})
