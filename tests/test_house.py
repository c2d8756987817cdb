"""The shape of the package (issue "The house, second pass"): small modules, short functions, one-way subpackages,
and documentation whose relative links resolve.

- No module of `hf_quailora/` is over 400 lines, and no function over 60 lines of code (its docstring excluded).
- `hf_quailora/quailora/` (the start) never mentions `dynamic_rank` (rank training builds on the start, not the
  reverse).
- Every relative link in README.md, docs/ and bench/RESULTS.md names a file that exists and, with `#anchor`, a
  heading of that file.
"""

import ast
import os
import re
from pathlib import Path

import pytest

from testing_utils import REPO_ROOT


ROOT = Path(REPO_ROOT)
PACKAGE = ROOT / "hf_quailora"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].end_lineno - body[0].lineno + 1
    return 0


def function_lengths(path: Path) -> dict[str, int]:
    """Lines of code of every function in `path` (decorators and docstring excluded), by qualified name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lengths = {}

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lengths[name] = child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree)
    return lengths


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_60_lines():
    long = {f"{p.relative_to(ROOT)}:{name}": n for p in _modules()
            for name, n in function_lengths(p).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code: {long}"


def test_function_lengths_count_code_not_docstrings(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f():\n    """Doc\n    string."""\n    return 1\n\n\nclass C:\n    def g(self):\n'
                      '        x = 1\n        return x\n')
    assert function_lengths(source) == {"f": 2, "C.g": 3}


def test_the_start_knows_nothing_of_rank_training():
    mentions = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((PACKAGE / "quailora").rglob("*.py"))
                for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "dynamic_rank" in line]
    assert not mentions, f"hf_quailora/quailora/ must not depend on dynamic_rank: {mentions}"


# ---------------------------------------------------------------------------------------------------------------------
# Links

def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        anchor = github_anchor(line.lstrip("#"))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", link)]


DOCUMENTS = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_github_anchor_rules():
    assert github_anchor(" Memory contract") == "memory-contract"
    assert github_anchor("All 200 held-out Alpaca examples: Gemma-3-270m at r = 64") == \
        "all-200-held-out-alpaca-examples-gemma-3-270m-at-r--64"
    assert github_anchor("`use_rank`: run at rank b") == "use_rank-run-at-rank-b"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    assert document.is_file(), document
    broken = []
    for link in relative_links(document):
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link} (no such heading in {os.path.relpath(path, ROOT)})")
    assert not broken, f"{document.relative_to(ROOT)}: {broken}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it at most 250 (details go to docs/)"
