"""One version, read from the installed distribution; a PEP 517 build system; the tools'
settings in pyproject.toml; no dependency that nothing imports."""
import importlib.metadata
import re
import sys
from pathlib import Path

import crossbar

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_one_version_from_the_distribution():
    assert crossbar.__version__ == importlib.metadata.version("xbarsim")
    literal = re.compile(r"__version__\s*=\s*['\"]\d+\.\d+")  # a second release number
    assert not [p for p in _own_sources() if literal.search(p.read_text())]


def _own_sources() -> list:
    """The repository's Python files, not those of a virtual environment or build made
    inside the clone (``python -m venv .venv`` there holds pip's and setuptools'
    sources, with release numbers of their own)."""
    def ours(path: Path) -> bool:
        parts = path.relative_to(ROOT).parts
        return not any(part.startswith(".") or part in ("build", "site-packages") for part in parts)

    return [p for p in ROOT.glob("*/**/*.py") if ours(p)]


def test_pyproject_declares_the_build_system_and_pytest_markers():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"
    options = pyproject["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in options["markers"])
    assert not (ROOT / "pytest.ini").exists()  # it would shadow pyproject.toml's settings


def test_every_dependency_is_imported_somewhere():
    sources = "\n".join(p.read_text() for p in ROOT.glob("*/**/*.py") if "tests" not in p.parts)
    imports = {"numpy": "numpy", "numba": "numba", "torch": "torch", "scipy": "scipy", "matplotlib": "matplotlib",
               "scikit-learn": "sklearn", "tqdm": "tqdm", "tomli": "tomli", "distributed": "distributed"}
    for requirement in importlib.metadata.requires("xbarsim"):
        name = re.split(r"[ <>=;!\[]", requirement, maxsplit=1)[0]
        if name == "pytest":
            continue
        module = imports[name]  # a new dependency must be added here, with its import name
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), f"{name} is never imported"
