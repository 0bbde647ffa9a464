"""Every third-party package the code imports is pinned: the apps' in requirements.txt, the tests' and tools' in
requirements.txt or requirements-dev.txt (a package that only arrives as another's dependency can move unnoticed)."""
import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"opsagent", "llmconfigs", "agentcore", "difyapi", "tests", "bench", "conftest", "manage"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==\S+", re.M)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned(*files: str) -> set[str]:
    return {_normal(name) for file in files for name in PIN.findall((ROOT / file).read_text())}


def _imports(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in OURS}


def _is_test(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return parts[0] in ("tests", "bench") or "tests" in parts or path.name == "conftest.py"


def _unpinned(modules: set[str], pinned: set[str]) -> list[str]:
    distributions = packages_distributions()
    missing = []
    for module in sorted(modules):
        names = {_normal(name) for name in distributions.get(module, [module])}
        if not names & pinned:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    return missing


SOURCES = [path for package in ("opsagent", "llmconfigs", "agentcore", "difyapi", "tests", "bench")
           for path in (ROOT / package).rglob("*.py")] + [ROOT / "conftest.py"]


def test_the_apps_imports_are_pinned_in_requirements_txt():
    modules = _imports(path for path in SOURCES if not _is_test(path))
    assert {"django", "orjson", "psycopg_pool"} <= modules, "the scan missed imports it must see"
    assert not _unpinned(modules, _pinned("requirements.txt")), _unpinned(modules, _pinned("requirements.txt"))


def test_the_tests_imports_are_pinned():
    pinned = _pinned("requirements.txt", "requirements-dev.txt")
    modules = _imports(path for path in SOURCES if _is_test(path))
    assert not _unpinned(modules, pinned), _unpinned(modules, pinned)
