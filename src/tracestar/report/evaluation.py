"""The report's evaluation section: what `tracestar eval` measured, drawn as HTML.

The content comes from `tracestar.evaluate.summary`, the same blocks report.md is drawn from, so
the figures and labels are computed once; here each block becomes real elements (lists, code,
tables, figures) with every value escaped. The PNG plots are embedded as `data:` images.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tracestar.evaluate import summary as sm
from tracestar.report.hits import escape, fmt_score

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inline(parts: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<code>{escape(text)}</code>" if style == "code" else escape(text) for style, text in parts)


def _table(table: sm.Table) -> str:
    """A `summary.Table` as HTML; columns from `numeric_from` on are right-aligned."""
    def row(cells: Sequence[str], tag: str) -> str:
        attrs = ["" if j < table.numeric_from else ' class="num"' for j in range(len(cells))]
        return "<tr>" + "".join(f"<{tag}{a}>{escape(c)}</{tag}>" for a, c in zip(attrs, cells)) + "</tr>"

    return f'<table class="md">{row(table.head, "th")}{"".join(row(r, "td") for r in table.rows)}</table>'


def _accuracy(acc: sm.Accuracy) -> str:
    """A `summary.Accuracy` as a sentence, and the warning eval attached to it in a note box."""
    if acc.value is None:
        return '<p class="accuracy">Model: first-token accuracy not recorded in metrics.json.</p>'
    on = f"on {escape(acc.n_queries)} queries" if acc.n_queries is not None else "on the evaluation queries"
    out = f'<p class="accuracy">Model: first-token accuracy <strong>{escape(acc.value)}</strong> {on}.</p>'
    if acc.warning:
        text = acc.warning[:1].upper() + acc.warning[1:]
        out += f'<p class="warn" role="note"><strong>Warning:</strong> {escape(text)}.</p>'
    return out


def _figure(eval_dir: Path, name: str) -> str:
    data = (eval_dir / name).read_bytes()
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{escape(name)}</figcaption></figure>")


def _block(block: sm.Block, eval_dir: Path) -> str:
    if isinstance(block, sm.Accuracy):
        return _accuracy(block)
    if isinstance(block, sm.Heading):
        return f"<h3>{escape(block.text)}</h3>"
    if isinstance(block, sm.Paragraph):
        return f"<p>{_inline(block.parts)}</p>"
    if isinstance(block, sm.Bullets):
        return f'<ul class="settings">{"".join(f"<li>{_inline(item)}</li>" for item in block.items)}</ul>'
    if isinstance(block, sm.Table):
        return _table(block)
    return _figure(eval_dir, block.name)


def model_accuracy_note(metrics: Mapping[str, Any]) -> str:
    """The model's first-token accuracy (and the warning eval attached to it) as HTML; says so
    when metrics.json does not record it."""
    return _accuracy(sm.accuracy_of(metrics))


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        rows = []
        for k, v in obj.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix, obj)]


def read_metrics(eval_dir: str | Path) -> dict | None:
    """metrics.json of an eval directory, or None when there is none or it is not a JSON object."""
    try:
        metrics = json.loads((Path(eval_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _pngs(eval_dir: Path) -> list[str]:
    """The PNG files of an eval directory, by name; a file that only says it is a PNG is left out."""
    names = []
    for png in sorted(eval_dir.glob("*.png")):
        with open(png, "rb") as fh:
            if fh.read(len(_PNG_MAGIC)) == _PNG_MAGIC:
                names.append(png.name)
    return names


def eval_section(eval_dir: str | Path) -> str:
    """The section for an eval directory: its metrics.json as blocks, then the raw metrics, collapsed."""
    d = Path(eval_dir)
    metrics = read_metrics(d)
    if metrics is None:  # the plots alone
        parts = [_figure(d, name) for name in _pngs(d)]
        if (d / "metrics.json").exists():
            parts.insert(0, '<p class="missing">metrics.json is unreadable or not a JSON object</p>')
    else:
        parts = [_block(b, d) for b in sm.summary(metrics, _pngs(d))]
        rows = "".join(
            f"<tr><th>{escape(k)}</th><td>{escape(fmt_score(v) if isinstance(v, float) else json.dumps(v))}</td></tr>"
            for k, v in _flatten(metrics)
        )
        parts.append(f'<details class="metrics"><summary>metrics.json</summary><table class="md">{rows}</table></details>')
    if not parts:
        parts.append(f'<p class="missing">no metrics.json or plots in {escape(d)}</p>')
    return f'<section class="query evaluation" id="evaluation"><h2>Evaluation results</h2>{"".join(parts)}</section>'
