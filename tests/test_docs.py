"""Module docstrings hold the commands to run, and `--help` prints them: they must survive."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("pneumojax", "configs", "experiments")
                 for p in (ROOT / d).rglob("*.py"))


def _docstring_source(path: pathlib.Path) -> str:
    """The module docstring as written, prefix and quotes included ('' if there is none)."""
    text = path.read_text()
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return ast.get_source_segment(text, body[0].value)
    return ""


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_command_continued_with_a_backslash_keeps_it(path):
    """In a plain (not raw) string, backslash-newline joins two lines, so `--help` would print
    a continued command as one line with its backslash gone."""
    source = _docstring_source(path)
    if source[:1] in "rR":
        return
    joined = [line for line in source.splitlines()
              if (len(line) - len(line.rstrip("\\"))) % 2 == 1]
    assert not joined, f"{path}: make its docstring raw (r\"\"\"): {joined}"


def test_the_check_sees_a_plain_docstring_that_joins_lines(tmp_path):
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text('"""Run:\n\n    python x.py \\\n        --flag\n"""\n')
    good.write_text('r"""Run:\n\n    python x.py \\\n        --flag\n"""\n')
    with pytest.raises(AssertionError, match="make its docstring raw"):
        test_a_command_continued_with_a_backslash_keeps_it(bad)
    test_a_command_continued_with_a_backslash_keeps_it(good)
    assert ast.get_docstring(ast.parse(bad.read_text())).count("\\") == 0  # the joined line
