"""Run mypy over the installed package's source: kvstore/, agents/, cli/, server/ (settings in pyproject.toml).

The repository lays kvstore's subpackages out beside it (pyproject.toml's package-dir: agents/ is
kvstore.agents, cli/ is kvstore.cli, ...), a mapping an editable install resolves at import time but mypy
cannot follow: given the folders as they are, it checks `agents.manager` and finds no `kvstore.agents`
(whose names then type as Any, unchecked). So this builds the package as installed out of symlinks, in
.mypy_cache/src/ (kept between runs, as mypy's own cache beside it), runs `mypy -p kvstore` there, and
prints mypy's report with each file's path in the repository.

    python .ci/typecheck.py [MYPY OPTIONS]     # exit status: mypy's (0 clean, 1 errors found)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# kvstore.<name> -> its folder in the repository (pyproject.toml's [tool.setuptools] package-dir)
SUBPACKAGES = {"agents": "agents", "cli": "cli", "server": "server", "migrations": "migrations"}


def build_tree(dest: Path) -> Path:
    """dest/kvstore: kvstore/'s entries and the subpackages' folders, each a symlink into the repository."""
    pkg = dest / "kvstore"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "kvstore").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in SUBPACKAGES.items():
        (pkg / name).symlink_to(ROOT / folder, target_is_directory=True)
    return pkg


def repo_path(line: str) -> str:
    """kvstore/agents/manager.py:12: ... -> agents/manager.py:12: ..."""
    return re.sub(r"^kvstore/(" + "|".join(SUBPACKAGES) + r")/", lambda m: SUBPACKAGES[m.group(1)] + "/", line)


def main(argv: list[str]) -> int:
    work = ROOT / ".mypy_cache" / "src"
    build_tree(work)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    cmd += ["--cache-dir", str(ROOT / ".mypy_cache"), *argv, "-p", "kvstore"]
    env = {**os.environ, "MYPYPATH": ""}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        print(repo_path(line))
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
