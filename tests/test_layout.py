"""The package's shape: the README's layout tree names every module, and no module-level import cycle."""
from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kd_utils"


def modules() -> dict[str, Path]:
    """kd_utils's modules by dotted name (packages by their __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kd_utils modules `name` imports when it is imported (not those imported inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    out.add(f"{source}.{alias.name}")
                elif source in known:
                    out.add(source)
    return out - {name}


def test_no_module_level_import_cycle():
    found = modules()
    graph = {name: top_level_imports(name, path, set(found)) for name, path in found.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_readme_layout_tree_names_every_module_and_only_those():
    text = (REPO / "README.md").read_text()
    tree = text[text.index("## Layout"):]
    tree = tree[tree.index("    kd_utils/"):tree.index("\n    params/")]
    listed = set()
    folder = ""
    for line in tree.splitlines()[1:]:
        match = re.match(r"^( +)(\S+)", line)
        if not match:
            continue
        indent, entry = len(match.group(1)), match.group(2)
        if entry.endswith("/"):
            folder = entry
        elif entry.endswith(".py"):
            listed.add(("" if indent == 6 else folder) + entry)
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert listed == files, f"missing from the README: {sorted(files - listed)}; gone: {sorted(listed - files)}"
