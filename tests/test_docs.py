"""The README and docs/ name only files that exist: their relative links, and the
repository paths they quote (a renamed or split module leaves no stale name)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_QUOTED_PATH = re.compile(r"`((?:crossbar|mapping|eval|benchmarks|tests|docs)/[\w/.-]+\.(?:py|md|png|toml))")


def named_files(document: Path) -> list:
    """(as written, the path it names) of each relative link and quoted repository path."""
    text = document.read_text()
    links = [(target, document.parent / target.split("#")[0]) for target in _LINK.findall(text)
             if not target.startswith(("http:", "https:", "#"))]
    return links + [(path, ROOT / path) for path in _QUOTED_PATH.findall(text)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_file_a_document_names_exists(document):
    assert named_files(document), f"{document.name} names no file: the patterns no longer match it"
    missing = [written for written, path in named_files(document) if not path.exists()]
    assert not missing, f"{document.name} names files that do not exist: {missing}"


def test_a_missing_file_is_found(tmp_path):
    document = tmp_path / "note.md"
    document.write_text("See [the notes](gone.md) and `crossbar/no_such_module.py`.")
    assert [path.exists() for _, path in named_files(document)] == [False, False]
