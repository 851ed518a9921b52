"""Layers as a checked contract: the import-linter contracts in pyproject.toml hold (README "Architecture").

A new ``import experiments`` / ``import hydra`` inside ``scones``, or Lightning inside the maths, fails here.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# in a child process: import-linter reconfigures logging (dictConfig), which would silence the other tests' loggers
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(sys.argv[1], no_cache=True))"


def test_import_contracts_are_kept():
    done = subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"import-linter contracts broken:\n{done.stdout}\n{done.stderr}"
    assert "kept" in done.stdout and "0 broken" in done.stdout
