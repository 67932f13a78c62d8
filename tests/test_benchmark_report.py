"""benchmarks.report, the writer every benchmark ends with: its own block of BENCHMARKS.md, and a quick run that
leaves the published files alone."""

from __future__ import annotations

import json

import pytest

from benchmarks import report


@pytest.fixture
def pages(tmp_path, monkeypatch):
    """The report's published and quick places, moved under tmp_path."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    page = root / "docs" / "BENCHMARKS.md"
    page.write_text(
        "# Benchmarks\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\ntext between\n\n"
        "<!-- b:begin -->\nold b\n<!-- b:end -->\n"
    )
    monkeypatch.setattr(report, "ROOT", root)
    monkeypatch.setattr(report, "RESULTS", root / "benchmarks" / "results")
    monkeypatch.setattr(report, "QUICK", root / "benchmarks" / "quick")
    monkeypatch.setattr(report, "BENCHMARKS_MD", page)
    return root, page


def test_a_benchmark_rewrites_only_its_own_block(pages):
    root, page = pages
    report.publish("a", {"x": 1}, "new a, see [the table](docs/BENCHMARKS.md)", quick=False)
    assert page.read_text() == (
        "# Benchmarks\n\n<!-- a:begin -->\nnew a, see [the table](BENCHMARKS.md)\n"
        "<!-- a:end -->\n\ntext between\n\n<!-- b:begin -->\nold b\n<!-- b:end -->\n"
    )
    assert json.loads((root / "benchmarks" / "results" / "a.json").read_text()) == {"x": 1}


def test_a_new_benchmark_gets_a_block_at_the_end(pages):
    _, page = pages
    before = page.read_text()
    report.publish("c", {}, "section c", quick=False)
    assert page.read_text() == before.rstrip() + "\n\n<!-- c:begin -->\nsection c\n<!-- c:end -->\n"
    report.publish("c", {}, "section c again", quick=False)
    assert page.read_text().count("<!-- c:begin -->") == 1 and "section c again" in page.read_text()


def test_a_quick_run_writes_only_under_quick(pages):
    root, page = pages
    before = page.read_text()
    written = report.publish("a", {"quick": True}, "quick a", quick=True)
    assert page.read_text() == before
    assert not (root / "benchmarks" / "results").exists()
    assert written == [root / "benchmarks" / "quick" / "a.json", root / "benchmarks" / "quick" / "BENCHMARKS.md"]
    assert "quick a" in written[1].read_text() and "old b" in written[1].read_text()
    assert report.images_dir(quick=True) == root / "benchmarks" / "quick" / "images"


def test_replace_block_without_markers_changes_nothing(pages):
    _, page = pages
    before = page.read_text()
    assert report.replace_block(page, "missing", "body") is False
    assert page.read_text() == before


def test_every_published_block_is_what_its_script_renders_from_its_results():
    """`python -m benchmarks.report` changes nothing: each block of BENCHMARKS.md is its section() of its JSON."""
    import importlib

    page = report.BENCHMARKS_MD.read_text()
    for name, module in report.SECTIONS.items():
        results = report.load(name)
        assert results is not None, f"benchmarks/results/{name}.json is missing"
        body = importlib.import_module(module).section(results)
        assert f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->" in page, f"the {name} block differs from its JSON"
