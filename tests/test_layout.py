"""Dependencies point one way: train/ -> sparsek_jax.nn / sparsek_jax.data -> the core -> pallas_kernels/.

Installed, train/ is imported as ``sparsek_train`` and pallas_kernels/ as ``sparsek_kernels``."""

import ast
import subprocess
import sys
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


def test_nothing_imports_the_directories_by_their_repository_names():
    # train/ and pallas_kernels/ install as sparsek_train and sparsek_kernels; the repository names work only
    # from a checkout.
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
