"""The package's structure: import arrows point one way, the core never reaches Axolotl, and
the viewer (`axolotl-cat inspect`) starts without torch; every path the README and the
docs/ pages name exists."""

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


# The package's floors, bottom first (docs/layout.md). A module may import its own unit and the
# units on lower floors; units on one floor never import each other. A new module is placed
# here, or test_every_module_has_a_floor fails.
FLOORS = [
    {  # torch-free: what every floor reads (the viewer imports only these and export/'s four)
        "vocabulary": ("core.errors", "core.config", "core.format", "core.granularity.base"),
    },
    {"state": ("core.state", "core.starting"), "gguf_base": ("core.gguf_base",)},
    # a fit's objective and comparisons reach a CAT model through state.py alone
    # (core/distill.py re-exports fit/distill.py for scripts/real_model/fit.py)
    {"layers": ("core.layers",), "fit": ("core.fit", "core.distill")},
    {"skills": ("core.skills",), "granularity": ("core.granularity",)},
    {"export": ("core.export",)},
    {"attach": ("core.attach",)},
    {
        "merge": ("core.merge",),
        "reexport": ("core.reexport",),
        "distributed": ("core.distributed",),
    },
    {"core": ("core",)},  # its __init__ names the public API, imported lazily
    {"report": ("report",)},
    {"cli": ("cli",)},
    {"integration": ("integration",)},
    {"package": ("",)},
]


def unit_of(module: str) -> tuple[int, str] | None:
    """(floor, unit) of a package module, by its longest listed prefix; None if unlisted."""
    name = module.removeprefix("axolotl_cat_plugin").removeprefix(".")
    matches = [
        (len(prefix), floor, unit)
        for floor, units in enumerate(FLOORS)
        for unit, prefixes in units.items()
        for prefix in prefixes
        if name == prefix or (prefix and name.startswith(prefix + "."))
    ]
    return max(matches)[1:] if matches else None


def test_every_module_has_a_floor():
    assert [m for m in graph() if unit_of(m) is None] == []


def test_import_arrows_between_units_point_down():
    """Issue 21: the subpackages show the flow, and imports follow it one way. Function-level
    imports count too (`imports` reads them), so a lazy import cannot hide an arrow up."""
    wrong = []
    for module, targets in graph().items():
        floor, unit = unit_of(module)
        for target in targets:
            target_floor, target_unit = unit_of(target)
            if target_unit != unit and target_floor >= floor:
                wrong.append(f"{module} ({unit}) -> {target} ({target_unit})")
    assert wrong == [], wrong


def test_the_floors_are_the_ones_the_docs_describe():
    """docs/layout.md lists the floors, bottom first, one numbered line each: `unit`, ...:"""
    layout = (REPO / "docs" / "layout.md").read_text()
    listed = [
        re.findall(r"`(\w+)`", line.split(":", 1)[0])
        for line in re.findall(r"^\d+\. (.*)$", layout, flags=re.MULTILINE)
    ]
    assert listed == [list(units) for units in FLOORS]


def test_every_subpackage_says_what_each_of_its_files_holds():
    """A subpackage's __init__ docstring names each of its modules (the layout at a glance)."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        if init.parent in (PACKAGE, PACKAGE / "core", PACKAGE / "integration"):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        unnamed = [p.name for p in init.parent.glob("*.py") if p.name != "__init__.py"]
        assert [name for name in unnamed if name not in doc] == [], init


def named_paths(text: str) -> list[str]:
    """The repository paths a page names (`scripts/...`, `docs/...`, ...)."""
    top = "scripts|tests|docs|example_yamls|axolotl_cat_plugin|\\.ci"
    path = rf"(?<![\w./-])((?:{top})/[\w./-]*)(?![\w./<*-])"  # not a pattern such as bench_<gpu>
    return re.findall(path, text)


def test_every_path_the_readme_and_the_docs_name_exists():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {page.name: named_paths(page.read_text()) for page in pages}
    assert "scripts/demo.sh" in named["README.md"] and "scripts/test.sh" in named["README.md"]
    missing = {
        page: sorted({path for path in paths if not (REPO / path.rstrip(".")).exists()})
        for page, paths in named.items()
    }
    assert not {page: paths for page, paths in missing.items() if paths}, missing


def test_the_readme_is_short_and_links_every_docs_page():
    """Issue 21: a newcomer reads the README in five minutes; the reference is in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    head = "\n".join(readme.splitlines()[:8])
    assert "scripts/demo.sh" in head and "scripts/test.sh" in head
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert pages and pages <= set(named_paths(readme)), pages - set(named_paths(readme))
    for page in pages:  # every link between the pages resolves
        text = (REPO / page).read_text()
        for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", text):
            assert (REPO / page).parent.joinpath(target).resolve().is_file(), (page, target)
