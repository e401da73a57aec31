"""docs/run-directory.md is generated from the contract module's own docstrings."""

import json
import re
from pathlib import Path

import pytest

from polca import store
from polca.report import docs

PAGE = Path(__file__).resolve().parents[1] / "docs" / "run-directory.md"


def test_run_directory_page_is_current():
    assert PAGE.read_text() == store.describe(), (
        "docs/run-directory.md is stale: regenerate it with "
        "`python -m polca.store > docs/run-directory.md`")


def test_the_page_names_every_array_kind_and_reader():
    page = store.describe()
    for name in (*store.ARRAYS, *store.TRAJECTORY_KINDS, "write_probe", "refresh", "lock"):
        assert f"`{name}`" in page, name


# -- the measured numbers are rendered from a run's summary, never typed ------------------------
ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / docs.SUMMARY_COPY
FRESH = ROOT / "runs" / "demo-addition" / "report" / "summary.json"


def committed_summary() -> dict:
    return json.loads(COMMITTED.read_text())


def test_readme_numbers_are_the_demo_summary():
    text = (ROOT / "README.md").read_text()
    assert docs.between(text, docs.README_BEGIN, docs.README_END) == docs.readme_block(
        committed_summary()), "README.md is stale: run `make demo` (it rewrites the block)"


def test_reproduction_table_is_the_demo_summary():
    text = (ROOT / "docs" / "reproduction.md").read_text()
    assert docs.between(text, docs.TABLE_BEGIN, docs.TABLE_END) == docs.table_block(
        committed_summary()), "docs/reproduction.md is stale: run `make demo`"


def without_times(summary: dict) -> dict:
    return {**summary, "run": {k: v for k, v in summary["run"].items() if k != "times"}}


@pytest.mark.skipif(not FRESH.is_file(), reason="no demo run in runs/ (make demo makes one)")
def test_the_kept_summary_is_what_a_fresh_demo_run_measures():
    """After `make demo` (or `polca demo addition`) in this checkout: the run measured what the
    docs say, its time aside."""
    assert without_times(json.loads(FRESH.read_text())) == without_times(committed_summary())


def test_the_docs_link_only_to_files_in_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        assert "shared/" not in text and "METHOD.md" not in text, page
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.name} → {target}"


def test_a_generated_block_keeps_what_is_around_it(tmp_path):
    page = tmp_path / "notes.md"
    page.write_text("my notes, no markers")
    docs.write_between(page, "<!-- b -->", "<!-- e -->", "one\n")
    assert page.read_text() == "my notes, no markers\n<!-- b -->\none\n<!-- e -->\n"
    docs.write_between(page, "<!-- b -->", "<!-- e -->", "two\n")  # replaced, the rest kept
    assert page.read_text() == "my notes, no markers\n<!-- b -->\ntwo\n<!-- e -->\n"
    fresh = tmp_path / "new" / "page.md"
    docs.write_between(fresh, "<!-- b -->", "<!-- e -->", "x\n")
    assert fresh.read_text() == "<!-- b -->\nx\n<!-- e -->\n"
