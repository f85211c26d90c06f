"""The rooms of docs/development.md's map stay as drawn: every module named there, no import cycle, no
library module importing a command-line one, the model interface free of objectives, and objective
names tested only where objectives are built and configured."""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = {ROOT / "fastvae": "fastvae", ROOT / "kernels": "fastvae.kernels", ROOT / "launch": "fastvae.launch"}
COMMAND_LINE = {"fastvae.train", "fastvae.evaluate", "fastvae.generate"}
ENTRY_POINTS = {"fastvae.train", "fastvae.evaluate", "fastvae.generate", "fastvae.export", "fastvae.tokenize", "fastvae.cli",
                "fastvae.commands", "fastvae"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: Path, known: dict) -> set[str]:
    """The fastvae modules `name` imports anywhere in its file (lazy imports inside functions too), with
    the packages that importing them runs, less its own ancestors (a package importing its child)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    with_packages = set(names)
    for n in names:
        parts = n.split(".")
        with_packages |= {".".join(parts[:i]) for i in range(2, len(parts))}
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
    return {n for n in with_packages if n in known and n != name and n not in ancestors}


def test_every_module_under_fastvae_is_on_the_map():
    text = (ROOT / "docs" / "development.md").read_text()
    missing = []
    for path in sorted((ROOT / "fastvae").rglob("*.py")):
        rel = path.relative_to(ROOT)
        folder = f"`{rel.parent}/`"
        if f"`{rel}`" not in text and not (folder in text and f"`{path.name}`" in text):
            missing.append(str(rel))
    assert missing == [], f"modules not on docs/development.md's map: {missing}"


def test_no_import_cycle_in_fastvae():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_library_modules_import_no_command_line_module():
    known = modules()
    crossing = {name: sorted(imported(name, path, known) & COMMAND_LINE) for name, path in known.items()
                if name not in ENTRY_POINTS and not name.startswith("fastvae.launch")}
    assert {k: v for k, v in crossing.items() if v} == {}


def test_the_model_interface_holds_no_objective():
    """fastvae/models/base.py imports nothing of losses, objectives or collectives, and no method of the
    interface takes an objective's weight (beta, capacity)."""
    known = modules()
    assert imported("fastvae.models.base", known["fastvae.models.base"], known) <= {"fastvae.ops"}
    tree = ast.parse(known["fastvae.models.base"].read_text())
    arguments = {a.arg for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for a in f.args.args}
    assert not arguments & {"beta", "capacity", "objective", "with_terms"}


def objective_name_tests(path: Path) -> list[str]:
    """Comparisons of something's `.objective` with a string: `loss.objective == "ldm"`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "objective" for s in sides) and \
                    any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_objective_names_are_tested_only_where_objectives_are_built_and_configured():
    allowed = {ROOT / "fastvae" / "config.py"}
    found = [hit for path in sorted((ROOT / "fastvae").rglob("*.py")) if path not in allowed
             and "objectives" not in path.parts for hit in objective_name_tests(path)]
    assert found == []
    assert objective_name_tests(ROOT / "fastvae" / "config.py")  # (the check sees them where they are)
