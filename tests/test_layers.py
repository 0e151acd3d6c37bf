"""The layers stay honest (AST only, nothing is imported):
- no ComfyUI import (`comfy`, `comfy_api`, `comfy_extras`, `folder_paths`, `server`) anywhere in `pti_ops/`;
- in `nodes/`, only `bridge.py` imports them;
- the pack's import graph has no cycle, counting imports inside functions and the implicit import
  of a module's parent packages (`from ..models.bundle import X` also runs `models/__init__.py`);
- the core's rooms import each other only downwards (`ROOM_LAYERS`), and nodes and the CLI import the
  core only through the public names of its packages.
"""

import ast
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server"}

# The core's rooms from the bottom up; a module may import its own room and the rooms below it.
# Files sit above models: their key rules (embedding keys, LoRA names) are the model family's.
ROOM_LAYERS = [
    {"errors", "checks", "user_warnings", "limits"},
    {"safe_write", "interpolation"},
    {"models"},
    {"files"},
    {"dataset", "placeholder", "aspect_buckets", "image_masks", "tag_captions"},
    {"training"},
    {"metrics", "regularizer"},
    {"pivot", "inversion", "lora_tune", "pivotal"},
    {"norm_stats", "sweeps"},
    {"toyworld"},
    {"cli", "__main__"},
]
LAYER_OF = {room: level for level, rooms in enumerate(ROOM_LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    """Dotted name of a pack file: `pti_ops.models.bundle`, `nodes.bridge`, `__pack__` for the entry point."""
    parts = list(path.relative_to(PACK).with_suffix("").parts)
    if parts == ["__init__"]:
        return "__pack__"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def pack_files() -> list[Path]:
    files = [PACK / "__init__.py"]
    for folder in ("pti_ops", "nodes"):
        files += sorted((PACK / folder).rglob("*.py"))
    return files


def known_modules() -> set[str]:
    return {module_name(p) for p in pack_files()}


def _resolve_relative(importer: str, importer_is_package: bool, level: int, name: str | None) -> str:
    if importer == "__pack__":
        base: list[str] = []
    else:
        base = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)] if level - 1 <= len(base) else []
    return ".".join(base + ([name] if name else []))


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) for every import in the file, module-level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    importer = module_name(path)
    modules = known_modules()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve_relative(importer, is_package(path), node.level, node.module)
            else:
                target = node.module or ""
            # `from . import bridge` imports the module `bridge`; `from .models import load_bundle`, the package.
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            found += [(name, node.lineno) for name in submodules] or [(target, node.lineno)]
    return found


def graph() -> dict[str, set[str]]:
    """Edges between pack modules, with the implicit parent-package imports."""
    modules = known_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for path in pack_files():
        importer = module_name(path)
        for target, _ in imports_of(path):
            if target not in modules:
                continue
            edges[importer].add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                # A package that contains the importer is already running; others are imported on the way.
                if parent in modules and not (importer == parent or importer.startswith(parent + ".")):
                    edges[importer].add(parent)
    for m in edges:
        edges[m].discard(m)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pti_ops" or len(parts) < 2:
        return None
    return parts[1]


def test_no_comfyui_import_in_the_core():
    offenders = []
    for path in sorted((PACK / "pti_ops").rglob("*.py")):
        for target, line in imports_of(path):
            if target.split(".")[0] in COMFY_MODULES:
                offenders.append(f"{path.relative_to(PACK)}:{line} imports {target}")
    assert offenders == []


def test_only_the_bridge_touches_comfyui_in_nodes():
    offenders = []
    for path in sorted((PACK / "nodes").glob("*.py")):
        if path.name == "bridge.py":
            continue
        for target, line in imports_of(path):
            if target.split(".")[0] in COMFY_MODULES:
                offenders.append(f"{path.relative_to(PACK)}:{line} imports {target}")
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_only_downwards():
    upward = []
    for importer, targets in graph().items():
        room = room_of(importer)
        if room is None or room not in LAYER_OF:
            continue
        for target in targets:
            target_room = room_of(target)
            if target_room is None or target_room == room:
                continue
            assert target_room in LAYER_OF, f"room {target_room!r} is missing from ROOM_LAYERS"
            if LAYER_OF[target_room] > LAYER_OF[room]:
                upward.append(f"{importer} -> {target}")
    assert upward == []


def test_every_room_of_the_core_is_placed():
    rooms = {p.stem if p.is_file() else p.name for p in (PACK / "pti_ops").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert rooms - set(LAYER_OF) == set()


@pytest.mark.parametrize("folder", ["nodes", "pti_ops/cli"])
def test_faces_use_public_names(folder):
    """Nodes and the CLI import a core package's public names, never a module inside a package."""
    modules = known_modules()
    deep = []
    for path in sorted((PACK / folder).glob("*.py")):
        for target, line in imports_of(path):
            parts = target.split(".")
            inside_package = len(parts) >= 3 and parts[0] == "pti_ops" and parts[1] != "cli"
            if inside_package and target in modules:
                deep.append(f"{path.relative_to(PACK)}:{line} imports {target}")
    assert deep == []
