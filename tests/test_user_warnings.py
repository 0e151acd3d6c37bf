"""warn_user: logged every time, collected by every open block, never Python's once-per-place warning."""

import ast
import logging
from pathlib import Path

from pti_ops.user_warnings import collect_warnings, warn_user, warnings_section

PTI_OPS = Path(__file__).resolve().parents[1] / "pti_ops"


def test_every_call_is_logged_and_collected(caplog):
    with caplog.at_level(logging.WARNING), collect_warnings() as outer:
        for _ in range(2):
            warn_user("3 image(s) were skipped")
        with collect_warnings() as inner:
            warn_user("another")
    assert [r.getMessage() for r in caplog.records] == ["3 image(s) were skipped"] * 2 + ["another"]
    assert outer == ["3 image(s) were skipped"] * 2 + ["another"] and inner == ["another"]
    with collect_warnings() as after:
        pass
    assert after == []  # a closed block receives nothing more


def test_warnings_section_lists_each_message_once():
    assert warnings_section([]) == ""
    assert warnings_section(["a", "b", "a"]) == "## Warnings\n\n- a\n- b\n"


def test_the_core_never_uses_pythons_once_per_place_warnings():
    """`warnings.warn` is shown once per process by default: in ComfyUI the second run would say nothing."""
    found = []
    for path in sorted(PTI_OPS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn":
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings":
                    found.append(f"{path.relative_to(PTI_OPS)}:{node.lineno}")
    assert found == [], f"use pti_ops.user_warnings.warn_user instead: {found}"
