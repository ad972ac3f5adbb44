"""benchmarks/reference/table.py: the reference-vs-retouch section of docs/results.md is generated from the
committed JSON rows, and is up to date with them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _table():
    spec = importlib.util.spec_from_file_location("reference_table", ROOT / "benchmarks" / "reference" / "table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(**kw):
    row = {"method": "M", "reference": "r@abc1234", "model": "shapes-sd", "cases": 3, "edit_success_ref": 2 / 3,
           "edit_success_retouch": 1.0, "bg_psnr_ref": 29.123, "bg_psnr_retouch": 29.2, "seconds_ref": 10.0,
           "seconds_retouch": 4.0, "nfe_ref": 200, "nfe_retouch": 100, "notes": "n"}  # fmt: skip
    return {**row, **kw}


def test_render_and_replace(tmp_path):
    t = _table()
    (tmp_path / "a.json").write_text(json.dumps(_row()))
    rows = t.load_rows(tmp_path)
    section = t.render(rows)
    assert "| M | r@abc1234 | shapes-sd | 3 | 67% / 100% | 29.12 / 29.20 | 2.50 | 200 / 100 | n |" in section
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n\n{t.START}\nold\n{t.END}\ntail\n")
    new = t.update(doc, section)
    assert new.startswith("intro\n\n") and new.endswith("\ntail\n") and "old" not in new


def test_missing_keys_are_an_error(tmp_path):
    t = _table()
    row = _row()
    del row["nfe_ref"]
    (tmp_path / "a.json").write_text(json.dumps(row))
    with pytest.raises(SystemExit, match="nfe_ref"):
        t.load_rows(tmp_path)


def test_results_doc_is_up_to_date():
    t = _table()
    assert t.update(t.DOC, t.render(t.load_rows())) == t.DOC.read_text(), "run benchmarks/reference/table.py"
