"""docs/run-directory.md is generated from the contract module's own docstrings."""

from pathlib import Path

from polca import store

PAGE = Path(__file__).resolve().parents[1] / "docs" / "run-directory.md"


def test_run_directory_page_is_current():
    assert PAGE.read_text() == store.describe(), (
        "docs/run-directory.md is stale: regenerate it with "
        "`python -m polca.store > docs/run-directory.md`")


def test_the_page_names_every_array_kind_and_reader():
    page = store.describe()
    for name in (*store.ARRAYS, *store.TRAJECTORY_KINDS, "write_probe", "refresh", "lock"):
        assert f"`{name}`" in page, name
