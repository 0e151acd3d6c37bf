"""Ready for the Comfy Registry: its pyproject fields, the ignore file, and what its scanner flags (issue #16).

The registry scans a published node for process spawning, dynamic code and environment reads. The
modules ComfyUI imports (the entry point, nodes/, the core without its command line and the toy
model's training script) use none: checked here on the syntax tree, so `module.eval()` (torch's
evaluation mode) is not mistaken for the `eval` builtin.
"""

import ast
import fnmatch
import re

import pytest
from test_layers import PACK, graph, module_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((PACK / "pyproject.toml").read_text(encoding="utf-8"))
# Not imported by ComfyUI: the command line and the toy model's training script (neither is on its import path).
NOT_IMPORTED_BY_COMFYUI = ("pti_ops/cli/*", "pti_ops/__main__.py", "pti_ops/toyworld/train.py")
FLAGGED_MODULES = {"subprocess", "pty", "commands", "popen2"}
FLAGGED_OS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv", "system", "popen", "execv", "execve",
              "execl", "execle", "execlp", "execvp", "execvpe", "spawnl", "spawnv", "spawnve", "posix_spawn", "fork"}
FLAGGED_BUILTINS = {"eval", "exec", "compile", "__import__"}


def shipped_modules() -> list:
    """The .py files on ComfyUI's import path: __init__.py, nodes/, pti_ops/ minus NOT_IMPORTED_BY_COMFYUI."""
    files = [PACK / "__init__.py", *sorted((PACK / "nodes").rglob("*.py")), *sorted((PACK / "pti_ops").rglob("*.py"))]
    return [p for p in files if not any(fnmatch.fnmatch(p.relative_to(PACK).as_posix(), g) for g in NOT_IMPORTED_BY_COMFYUI)]


def flagged(path) -> list[str]:
    """What the registry's scanner would flag in one file, as `line: what`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in FLAGGED_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if (node.module or "").split(".")[0] in FLAGGED_MODULES:
                found.append(f"{node.lineno}: from {node.module} import")
            if node.module == "os":
                found += [f"{node.lineno}: from os import {a.name}" for a in node.names if a.name in FLAGGED_OS]
        elif isinstance(node, ast.Attribute) and node.attr in FLAGGED_OS:
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(f"{node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FLAGGED_BUILTINS:
            found.append(f"{node.lineno}: {node.func.id}()")
    return sorted(found, key=lambda item: int(item.split(":")[0]))


def test_no_subprocess_eval_exec_or_environment_reads_where_comfyui_imports():
    problems = [f"{path.relative_to(PACK)}:{item}" for path in shipped_modules() for item in flagged(path)]
    assert problems == []


def test_the_scan_catches_what_it_looks_for(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import os, subprocess\nfrom os import environ\nx = os.environ.get('A')\neval('1')\nmodel.eval()\n"
                    "os.getenv('B')\nexec('y = 1')\n")
    assert flagged(path) == ["1: import subprocess", "2: from os import environ", "3: os.environ", "4: eval()",
                             "6: os.getenv", "7: exec()"]


def test_the_modules_left_out_of_the_scan_are_not_imported_by_what_comfyui_loads():
    edges = graph()
    scanned = {module_name(p) for p in shipped_modules()}
    left_out = {module_name(p) for p in (PACK / "pti_ops").rglob("*.py")} - scanned
    reached = [f"{a} -> {b}" for a in scanned for b in edges.get(a, ()) if b in left_out]
    assert left_out and reached == []


def test_pyproject_has_what_the_registry_requires():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    # The node id: under 100 characters, letters, digits, - _ . only, no two specials in a row, a letter first.
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # semantic version X.Y.Z
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert project["description"] and project["license"] == {"text": "MIT"}
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]) and comfy["DisplayName"]
    assert set(comfy) <= {"PublisherId", "DisplayName", "Icon", "Banner", "includes", "requires-comfyui", "Models", "web"}


def normalised(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement.split("#")[0]).lower()


def test_requirements_txt_is_in_step_with_pyproject():
    """ComfyUI-Manager installs requirements.txt, pip the pyproject: the same packages and bounds."""
    lines = (PACK / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = sorted(normalised(line) for line in lines if normalised(line))
    assert requirements == sorted(normalised(dep) for dep in PYPROJECT["project"]["dependencies"])


@pytest.mark.parametrize("path, published", [
    ("tests/test_registry.py", False), ("bench/bench_training.py", False), ("pti_ops/toyworld/train.py", False),
    ("docs/toyworld-results.json", False), (".ci/run", False),
    ("pti_ops/toyworld/model/unet/diffusion_pytorch_model.safetensors", True), ("pti_ops/toyworld/demo.py", True),
    ("workflows/pivotal_tuning_sd15.json", True), ("nodes/bridge.py", True), ("README.md", True),
    ("pyproject.toml", True), ("requirements.txt", True), ("docs/architecture.md", True),
])  # fmt: skip
def test_comfyignore_keeps_development_files_out_and_the_toy_model_in(path, published):
    patterns = [line.strip() for line in (PACK / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    ignored = any(path.startswith(p) if p.endswith("/") else fnmatch.fnmatch(path, p) for p in patterns)
    assert ignored is not published
    assert (PACK / path).exists()
