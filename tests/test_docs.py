"""The docs: README as the front door, one page per task, every command accounted for, the
config reference generated from the config's own docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools.config_reference import PAGE, render

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(?:<!--(?P<tag>[^>]*)-->\s*\n)?```bash\n", re.M)
NAMED_TEST = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def test_config_reference_is_current():
    assert PAGE.read_text() == render(), "docs/config_reference.md is stale: run python tools/config_reference.py"


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_block_says_which_test_runs_it_or_what_it_needs(page):
    """A bash block is preceded by <!-- run by: tests/FILE.py::TEST ... --> naming tests that
    exist, or by <!-- needs: ... --> naming the hardware or data the test machines lack."""
    for match in BLOCK.finditer(page.read_text()):
        line = page.read_text()[: match.start()].count("\n") + 1
        tag = (match.group("tag") or "").strip()
        assert tag.startswith(("run by:", "needs:")), f"{page.name}:{line}: a bash block without run by/needs"
        for path, name in NAMED_TEST.findall(tag):
            source = ROOT / path
            assert source.is_file(), f"{page.name}:{line}: {path} does not exist"
            assert not name or re.search(rf"def {name}\(", source.read_text()), f"{page.name}:{line}: no {path}::{name}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_links_between_pages_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"
