"""Dependencies point one way: train/ -> sparsek_jax.nn / sparsek_jax.data -> the core -> pallas_kernels/.

Installed, train/ is imported as ``sparsek_train`` and pallas_kernels/ as ``sparsek_kernels``."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def is_in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_installed_import_names_are_the_projects_own():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(is_in(p, "sparsek_jax") or p in ("sparsek_kernels", "sparsek_train") for p in setuptools["packages"])
    assert setuptools["package-dir"] == {"sparsek_kernels": "pallas_kernels", "sparsek_train": "train"}
    # Nothing imports the directories by their repository names (that works only from a checkout).
    sources = ("sparsek_jax", "pallas_kernels", "train", "benchmarks", "tests")
    for path in (p for d in sources for p in (ROOT / d).rglob("*.py")):
        bad = {m for m in imported_modules(path) if is_in(m, "train") or is_in(m, "pallas_kernels")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_train_imports_train():
    for package in ("sparsek_jax", "pallas_kernels", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            bad = {m for m in imported_modules(path) if is_in(m, "sparsek_train")}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_core_imports_no_flax_and_kernels_know_nothing_above():
    core = [p for p in (ROOT / "sparsek_jax").glob("*.py")]
    for path in core:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("flax", "optax", "orbax", "tensorflow_datasets",
                                                                         "grain")
               or is_in(m, "sparsek_jax.nn") or is_in(m, "sparsek_jax.data")}
        assert not bad, f"{path.relative_to(ROOT)} (functional core) imports {bad}"
    for path in (ROOT / "pallas_kernels").rglob("*.py"):
        bad = {m for m in imported_modules(path) if is_in(m, "sparsek_jax") or is_in(m, "sparsek_train")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    code = "import sys, sparsek_jax; print(any(m.split('.')[0] == 'flax' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
