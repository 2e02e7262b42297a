"""The package boundaries hold: read every module's imports (ast), including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("shared", "teacher_server", "student_trainer", "devkit")
# package -> packages of ours it may import
ALLOWED = {
    "shared": {"shared"},
    "teacher_server": {"shared", "teacher_server"},
    "student_trainer": {"shared", "student_trainer", "devkit"},
    "devkit": {"devkit"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(OURS)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package])
        for f in files
        if imported_packages(f) - ALLOWED[package]
    }
    assert not bad, f"{package}/ imports packages it must not: {bad}"


def test_no_module_is_over_600_lines():
    long = {
        str(f.relative_to(ROOT)): n
        for pkg in OURS
        for f in (ROOT / pkg).rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 600
    }
    assert not long, f"split these modules (STYLE.md: no file over ~600 lines): {long}"
