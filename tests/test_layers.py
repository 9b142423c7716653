"""The layers point one way: ``deploy -> pipeline -> {retrieval, speculation}``. A module may
import its own package and the layers below it, never one above or beside it -- not by an
``import`` statement and not by ``importlib.import_module`` of a module name in a string."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each package may import of the project's packages (besides itself)
ALLOWED = {"speculation": set(), "retrieval": set(), "pipeline": {"retrieval", "speculation"},
           "deploy": {"pipeline", "retrieval", "speculation"}}


def _imported(tree: ast.AST, package: str, module_path: Path) -> set[tuple[int, str]]:
    names: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(node.lineno, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add((node.lineno, arg.value))
        elif isinstance(node, (ast.Tuple, ast.List)):
            # module names listed as strings for a later import_module (the old CLI's registry)
            for elt in node.elts:
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str) and "." in elt.value \
                        and elt.value.split(".")[0] in ALLOWED and " " not in elt.value:
                    names.add((node.lineno, elt.value))
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_reaches_up_or_sideways(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for lineno, name in _imported(tree, package, path):
            top = name.split(".")[0]
            if top in ALLOWED and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_console_script_is_the_top_layer():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'specrag = "deploy.cli:main"' in text


@pytest.mark.parametrize("command", [["--help"], ["generate", "--help"], ["ask", "--help"], ["ingest", "--help"]])
def test_light_commands_never_import_ray(command):
    """Building the parser and running the pipeline's commands' help imports neither Ray nor
    torch (they load inside the command functions that need them)."""
    code = ("import sys\nfrom deploy.cli import main\n"
            f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
