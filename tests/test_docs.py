"""The docs stay true to the code: every "SPEC.md §n" the code cites is a section of docs/dify/SPEC.md, every
environment variable opsagent/settings.py reads is in docs/configuration.md, and every relative link (and anchor) in
the README and docs/ leads somewhere. Plain file reads: no database."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SPEC = DOCS / "dify" / "SPEC.md"
CONFIGURATION = DOCS / "configuration.md"
SETTINGS = ROOT / "opsagent" / "settings.py"
# Directories that are not the project's own source (virtualenv, mutmut's work copy, generated files).
SKIPPED_DIRS = {".git", ".venv", "venv", "mutants", "node_modules", "staticfiles", "media", "var", "__pycache__"}

SECTION_SIGN = re.compile(r"§\s*(\d+)(?:\s*[-–]\s*§?\s*(\d+))?")
SPEC_HEADING = re.compile(r"^#{1,6}\s+§?(\d+)\.", re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _source_files(suffix: str) -> list[Path]:
    files = []
    for path in ROOT.rglob(f"*{suffix}"):
        if not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts):
            files.append(path)
    return sorted(files)


# ----- "SPEC.md §n" citations -----

def spec_citations() -> dict[int, list[str]]:
    """Section numbers cited next to "SPEC" on a line of the project's Python files (a range §5-§9 cites each
    section in it), with where."""
    cited: dict[int, list[str]] = {}
    for path in _source_files(".py"):
        if path == Path(__file__).resolve():
            continue  # this file's own examples are not citations
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "SPEC" not in line:
                continue
            for match in SECTION_SIGN.finditer(line[line.index("SPEC"):]):
                first = int(match.group(1))
                last = int(match.group(2) or first)
                for section in range(first, last + 1):
                    cited.setdefault(section, []).append(f"{path.relative_to(ROOT)}:{number}")
    return cited


def spec_sections(text: str) -> set[int]:
    return {int(number) for number in SPEC_HEADING.findall(text)}


def test_every_spec_section_the_code_cites_is_a_heading_of_the_spec():
    cited = spec_citations()
    assert cited, "no SPEC.md citation found: the scan is broken"
    sections = spec_sections(SPEC.read_text(encoding="utf-8"))
    missing = {f"§{section}": where for section, where in cited.items() if section not in sections}
    assert not missing, f"cited in the code but not a section of docs/dify/SPEC.md: {missing}"


def test_the_citation_scan_sees_ranges_and_lists():
    assert spec_sections("## 1. Transport\n### 10. Audio\ntext 3. no\n") == {1, 10}
    line = 'x = 1  # the shapes (SPEC.md §2, §5-§7) and (SPEC §11)'
    found = [(int(m.group(1)), m.group(2)) for m in SECTION_SIGN.finditer(line[line.index("SPEC"):])]
    assert found == [(2, None), (5, "7"), (11, None)]


# ----- environment variables -----

def settings_env_vars(source: str) -> set[str]:
    """Names of the environment variables a settings module reads: `env("X")`, `env.bool("X", ...)` and the other
    django-environ readers, `os.environ["X"]`, `os.environ.get("X")`, `os.getenv("X")`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names.add(key.value)
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        func = node.func
        reads_env = (
            (isinstance(func, ast.Name) and func.id == "env")
            or (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "env"
                and func.attr != "read_env")
            or (isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault") and _is_os_environ(func.value))
            or (isinstance(func, ast.Attribute) and func.attr == "getenv"
                and isinstance(func.value, ast.Name) and func.value.id == "os")
        )
        if reads_env:
            names.add(first.value)
    return names


def _is_os_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os")


def test_every_environment_variable_the_settings_read_is_documented():
    names = settings_env_vars(SETTINGS.read_text(encoding="utf-8"))
    assert {"DJANGO_SECRET_KEY", "FIELD_ENCRYPTION_KEY", "DATABASE_URL"} <= names, "the settings scan is broken"
    documented = CONFIGURATION.read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in documented)
    assert not missing, f"read in opsagent/settings.py but not in docs/configuration.md: {missing}"


def test_the_settings_scan_sees_every_way_of_reading_the_environment():
    source = (
        'import os\nA = env("ONE")\nB = env.bool("TWO", default=False)\nC = env.list("THREE", default=[])\n'
        'D = os.environ.get("FOUR")\nE = os.environ["FIVE"]\nF = os.getenv("SIX")\nenv.read_env("not-a-var")\n'
        'G = other("SEVEN")\n'
    )
    assert settings_env_vars(source) == {"ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX"}


# ----- links -----

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(heading) for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file (or heading anchor) does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    return broken


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_every_relative_link_in_the_readme_and_the_docs_resolves():
    files = markdown_files()
    assert len(files) > 5 and sum(len(LINK.findall(p.read_text(encoding="utf-8"))) for p in files) > 20
    broken = {str(p.relative_to(ROOT)): links for p in files if (links := broken_links(p))}
    assert not broken, f"links to missing files or headings: {broken}"


def test_the_readme_links_every_docs_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*.md"))
                if f"]({p.relative_to(ROOT).as_posix()})" not in readme]
    assert not unlinked, f"docs files the README's Documentation section does not link: {unlinked}"


def test_the_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# A title\n## The `X_*` settings\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-title) [ok](other.md#the-x_-settings) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nothing) [self](#local)\n## Local\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md", "other.md#nothing"]
