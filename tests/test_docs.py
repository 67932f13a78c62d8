"""The docs cannot drift from the code: the Python examples of README.md and docs/USAGE.md run.

Each document's ```python blocks run in order in one namespace (a later block may use what an earlier
one made), in a scratch folder with KVSTORE_HOME pointing into it, on the built-in offline model.
A block marked `# doctest: skip` (it needs a real model, or only illustrates) is compiled, not run.
Every `kvstore <command>` shown in a shell block must exist: its `--help` exits 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "USAGE.md"]
SKIP = "# doctest: skip"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL = {"bash", "sh", "shell", "console", "zsh"}


def code_blocks(path: Path, langs: set[str]) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block in one of `langs`."""
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) in langs]


def doc_ids() -> list:
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in DOCS]


@pytest.mark.parametrize("doc", doc_ids())
def test_doc_has_runnable_examples(doc):
    """Each document exists and shows at least one example that really runs."""
    runnable = [code for _, code in code_blocks(doc, {"python"}) if SKIP not in code]
    assert len(runnable) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("doc", doc_ids())
def test_python_examples_run(doc, tmp_path, monkeypatch):
    """Run the document's Python blocks in order; a failure names the block's line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVSTORE_HOME", str(tmp_path / "kvstore-home"))
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for line, code in code_blocks(doc, {"python"}):
        if SKIP in code:
            continue
        try:
            exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - re-raised with the block's location
            raise AssertionError(f"the python block at {doc.name} line {line} failed: {e!r}") from e
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("doc", doc_ids())
def test_skipped_examples_compile(doc):
    """Blocks that do not run (real models, illustrations) must still be valid Python."""
    for line, code in code_blocks(doc, {"python"}):
        if SKIP in code:
            compile(code, f"{doc.name}:{line}", "exec")


def shown_commands() -> list[tuple[str, ...]]:
    """Every distinct `kvstore <command>` (with its subcommand path) in the docs' shell blocks."""
    seen: dict[tuple[str, ...], None] = {}
    for doc in DOCS:
        if not doc.exists():
            continue
        for _, code in code_blocks(doc, SHELL):
            for raw in code.splitlines():
                line = raw.strip().lstrip("$ ").split("#")[0]
                for part in line.split("&&"):
                    words = part.split()
                    if len(words) >= 2 and words[0] == "kvstore":
                        rest = _after_options(words[1:])
                        if rest:
                            seen[(rest[0],)] = None
    return list(seen)


def _after_options(words: list[str]) -> list[str]:
    """The words after the leading global options (`--store PATH`, `--blobs PATH`) of a kvstore command line."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in ("--store", "--blobs") else 1
    return words[i:]


def test_docs_show_cli_commands():
    """The docs show the command line at all (so the next test is not vacuous)."""
    assert len(shown_commands()) >= 3


@pytest.mark.parametrize("command", shown_commands(), ids=lambda c: " ".join(c))
def test_shown_cli_commands_exist(command):
    """`kvstore <command> --help` exits 0 for every command the docs show."""
    from click.testing import CliRunner

    from kvstore.cli.main import cli

    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
