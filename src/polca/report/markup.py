"""Small HTML helpers shared by the report's sections: escaping, notes, folding, tables."""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pandas as pd

MAX_TABLE_ROWS = 500


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    if isinstance(value, (dict, list, tuple, np.ndarray)):
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value,
                          default=str)
    return str(value)


def table(frame: pd.DataFrame, caption: str, text_columns=(), nowrap_columns=(),
          digits: int = 4) -> str:
    """``frame`` as an escaped HTML table in a horizontally scrolling box; tables longer than
    ``MAX_TABLE_ROWS`` are cut with a note. ``nowrap_columns`` keep each line unbroken; floats
    show ``digits`` significant digits.

    >>> page = table(pd.DataFrame({"a": [1.23456]}), "<cap>")
    >>> "<caption>&lt;cap&gt;</caption>" in page, "<td>1.235</td>" in page
    (True, True)
    """
    shown = frame.head(MAX_TABLE_ROWS)
    columns = list(shown.columns)
    texts = {c for c in columns if c in text_columns or c in nowrap_columns
             or not pd.api.types.is_numeric_dtype(shown[c])}
    head = "".join(f'<th class="{"text" if c in texts else ""}">{esc(c)}</th>' for c in columns)
    body = []
    for row in shown.itertuples(index=False):
        cells = []
        for c, v in zip(columns, row):
            inner = esc(fmt(v, digits)).replace("\n", "<br>")
            css = "nowrap" if c in nowrap_columns else "text" if c in texts else ""
            cells.append(f'<td class="{css}">{inner}</td>' if css else f"<td>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (f"<p class=\"note\">{len(frame) - len(shown)} more rows not shown</p>"
            if len(frame) > len(shown) else "")
    return (f'<div class="scroll"><table><caption>{esc(caption)}</caption><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>{more}")


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys (lists and scalars are leaves)."""
    if not isinstance(obj, dict):
        return {prefix or "value": obj}
    out = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out
