"""The package's structure: import arrows point one way, the core never reaches Axolotl, and
the viewer (`axolotl-cat inspect`) starts without torch; every path the README names exists."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "axolotl_cat_plugin"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports at run time, at any depth (function-level too)."""
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    )
    found = set()
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):  # `if TYPE_CHECKING:` imports exist for annotations only
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_cycle_in_the_package():
    edges = graph()
    # the package's __init__ files only name what lives elsewhere (imported lazily)
    edges = {
        m: {t for t in ts if not t.endswith(("axolotl_cat_plugin", ".core"))}
        for m, ts in edges.items()
    }
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                raise AssertionError(" -> ".join([*path, node, target]))
            if target not in state:
                visit(target, [*path, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_core_never_imports_axolotl_or_the_integration():
    for path in (PACKAGE / "core").rglob("*.py"):
        for target in imports(path):
            assert not target.startswith(("axolotl.", "axolotl_cat_plugin.integration")), (
                path,
                target,
            )
            assert target != "axolotl", path


def test_inspect_imports_no_torch(tmp_path):
    (tmp_path / "cat_coefficients.json").write_text(
        json.dumps(
            {"format_version": 1, "skills": [{"name": "a"}], "granularity": "module", "modules": {}}
        )
    )
    code = (
        "import sys; from axolotl_cat_plugin.cli import main; main(['inspect', sys.argv[1]]); "
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_public_definition_says_what_it_does():
    """Every public function, class and method of the package has a docstring (issue 14)."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name[0] == "_":
                continue
            members = [node] + [
                member
                for member in getattr(node, "body", [])
                if isinstance(node, ast.ClassDef)
                and isinstance(member, ast.FunctionDef)
                and member.name[0] != "_"
            ]
            for member in members:
                if not ast.get_docstring(member):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{member.name}")
    assert not missing, missing


def test_no_package_file_is_over_about_300_lines():
    """Issue 14: a file past ~300 lines is doing two jobs; split it where the jobs part."""
    sizes = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > 320} == {}


def test_every_path_the_readme_names_exists():
    top = "scripts|tests|docs|example_yamls|axolotl_cat_plugin|\\.ci"
    path = rf"(?<![\w./-])((?:{top})/[\w./-]*)(?![\w./<*-])"  # not a pattern such as bench_<gpu>
    named = re.findall(path, (REPO / "README.md").read_text())
    assert "scripts/demo.sh" in named and "scripts/test.sh" in named
    missing = sorted({path for path in named if not (REPO / path.rstrip(".")).exists()})
    assert not missing, f"the README names paths that do not exist: {missing}"
