"""The docs cannot drift from the code: every code block of README.md and docs/ runs as written.

Each document's ```python and shell blocks run in order in one fresh folder (a later block may use what
an earlier one made): Python blocks in one namespace, shell blocks through bash with the installed
`kvstore` command first on PATH. HOME is a fresh folder too, so `~/.kvstore` starts empty, as on a new
machine; only the built-in model's build and the weight-hash cache are shared, to save time.
A block that cannot run here says why on a line `# doctest: skip (reason)`: it is then compiled
(Python) or only checked for commands that exist (shell), never run, and never skipped silently.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "# doctest: skip"
SKIP_WITH_REASON = re.compile(r"# doctest: skip\s+\((.+)\)")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL = {"bash", "sh", "shell", "console", "zsh"}


def code_blocks(path: Path, langs: set[str]) -> list[tuple[int, str, str]]:
    """(line number, language, code) of each fenced block in one of `langs`."""
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    text = path.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text) if m.group(1) in langs
    ]


def doc_ids() -> list:
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in DOCS]


@pytest.mark.parametrize("doc", doc_ids())
def test_every_skip_says_why(doc):
    """A block that does not run names its reason: `# doctest: skip (needs a PostgreSQL server)`."""
    for line, _, code in code_blocks(doc, {"python"} | SHELL):
        if SKIP in code:
            assert SKIP_WITH_REASON.search(code), f"{doc.name} line {line}: a skip without a (reason)"


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs" / "USAGE.md"], ids=["README.md", "docs/USAGE.md"])
def test_doc_has_runnable_examples(doc):
    """The user's two entry points show examples that really run, in Python and on the command line."""
    runnable = {lang for _, lang, code in code_blocks(doc, {"python"} | SHELL) if SKIP not in code}
    assert "python" in runnable and runnable & SHELL


def _fresh_environment(folder: Path) -> dict[str, str]:
    from kvstore.models.builtin import builtin_model_path

    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(
        HOME=str(folder / "home"),
        KVSTORE_MODELS=str(builtin_model_path().parent),
        KVSTORE_CACHE_DIR=os.environ.get("KVSTORE_CACHE_DIR") or str(Path.home() / ".cache" / "kvstore"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    (folder / "home").mkdir()
    return env


def runnable(doc: Path) -> list[tuple[int, str, str]]:
    return [(line, lang, code) for line, lang, code in code_blocks(doc, {"python"} | SHELL) if SKIP not in code]


@pytest.mark.slow
@pytest.mark.parametrize("doc", [p for p in doc_ids() if runnable(p.values[0])])
def test_code_blocks_run_as_written(doc, tmp_path, monkeypatch):
    """Run the document's blocks in order in a fresh folder; a failure names the block's line.

    (Documents whose every block says why it cannot run here are covered by test_every_skip_says_why.)
    """
    blocks = runnable(doc)
    work = tmp_path / "fresh"
    work.mkdir()
    env = _fresh_environment(tmp_path)
    monkeypatch.chdir(work)
    for key in [k for k in os.environ if k.startswith("KVSTORE_")]:
        monkeypatch.delenv(key)
    for key in ("HOME", "KVSTORE_MODELS", "KVSTORE_CACHE_DIR"):
        monkeypatch.setenv(key, env[key])
    namespace: dict = {"__name__": "__docs__"}
    for line, lang, code in blocks:
        if lang == "python":
            try:
                exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - re-raised with the block's location
                raise AssertionError(f"the python block at {doc.name} line {line} failed: {e!r}") from e
        else:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, (
                f"the shell block at {doc.name} line {line} exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )


def _bound_and_used(code: str, where: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(names the code binds, (line, name) of each name it reads), from its syntax tree."""
    bound: set[str] = set()
    used: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(code, where)):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                used.append((node.lineno, node.id))
            else:
                bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
    return bound, used


def undefined_names(doc: Path) -> list[str]:
    """Names a Python block reads that neither it nor an earlier block of the document defines.

    The blocks run in order in one namespace, so a block may use what an earlier one made; a block
    marked skip is never run, and this is what checks that it would run as written (issue 27: a skipped
    block used `kvstore.open` without `import kvstore`).
    """
    known = set(dir(builtins))
    problems = []
    for line, _, code in code_blocks(doc, {"python"}):
        bound, used = _bound_and_used(code, f"{doc.name}:{line}")
        problems += [
            f"{doc.name} line {line + n}: {name!r} is not defined (import it in the block, or in an earlier one)"
            for n, name in used
            if name not in known and name not in bound
        ]
        known |= bound
    return problems


@pytest.mark.parametrize("doc", doc_ids())
def test_every_name_a_block_uses_is_defined(doc):
    """Every Python block, run or skipped, imports or defines what it uses (or an earlier block does)."""
    assert undefined_names(doc) == []


def test_a_block_without_its_import_is_caught(tmp_path):
    """The check above finds the mistake it exists for, in a skipped block and in a later one."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```python\n# doctest: skip (fetches a model)\nmgr = AgentManager('m', kvstore.open('s'))\n```\n"
        "```python\nimport kvstore\nfrom kvstore.agents import AgentManager\n```\n"
        "```python\n# doctest: skip (a server)\nAgentManager('m', kvstore.open()).list()\nprint(json.dumps({}))\n```\n"
    )
    assert [p.split(": ", 1)[1].split(" is")[0] for p in undefined_names(doc)] == [
        "'AgentManager'",
        "'kvstore'",
        "'json'",
    ]


@pytest.mark.parametrize("doc", doc_ids())
def test_skipped_examples_compile(doc):
    """Python blocks that do not run (real models, servers) must still be valid Python."""
    for line, _, code in code_blocks(doc, {"python"}):
        if SKIP in code:
            compile(code, f"{doc.name}:{line}", "exec")


def shown_commands() -> list[tuple[str, ...]]:
    """Every distinct `kvstore <command>` (with its subcommand path) in the docs' shell blocks."""
    seen: dict[tuple[str, ...], None] = {}
    for doc in DOCS:
        if not doc.exists():
            continue
        for _, _, code in code_blocks(doc, SHELL):
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
    while i < len(words) and words[i].startswith("-"):  # (they may also come after the command)
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


def test_a_test_run_writes_no_tracked_file(monkeypatch, tmp_path):
    """The reliability figures of a test run go to an ignored file; only an explicit publish writes the tracked one."""
    from reliability import report

    monkeypatch.delenv(report.PUBLISH_ENV, raising=False)
    assert report.results_path() == report.LOCAL
    ignored = subprocess.run(["git", "check-ignore", "-q", str(report.LOCAL)], cwd=ROOT)
    if (ROOT / ".git").exists():
        assert ignored.returncode == 0, f"{report.LOCAL} is not ignored by git"
    monkeypatch.setenv(report.PUBLISH_ENV, "1")
    assert report.results_path() == report.PUBLISHED
    target = tmp_path / "figures.json"
    report.record("probe", runs=2)
    assert report.write(target) == target and '"probe"' in target.read_text()
