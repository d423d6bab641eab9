"""The house's size and hygiene targets, measured on the checkout: file and function lengths in paper_assets/, where
each PAPER_ASSETS_* name is defined, the length of README.md and BENCHMARKS.md, and development history in the
project's text. Prints one line per target; with --strict, exits 1 when one is not met (CI prints them)."""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
MAX_README_LINES, MAX_BENCHMARKS_LINES = 200, 300
# argparse declarations are long lists of add_argument calls, not logic.
PARSER_FUNCTIONS = {"build_parser", "register"}
HISTORY = re.compile(r"\bsession \d+\b|\bsessions \d+|\blease\b|\blent\b", re.IGNORECASE)
TEXT_FILES = ("README.md", "BENCHMARKS.md", "RELIABILITY.md", "Makefile", "docs", "paper_assets", "tools", "deploy")


def long_files() -> list[str]:
    return [f"{p.relative_to(REPO)} ({n} lines)" for p in sorted((REPO / "paper_assets").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]


def long_functions() -> list[str]:
    found = []
    for path in sorted((REPO / "paper_assets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in PARSER_FUNCTIONS:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def settings_defined_more_than_once() -> list[str]:
    """PAPER_ASSETS_* names written as a whole string literal in more than one place of the package."""
    places: dict[str, list[str]] = {}
    for path in sorted((REPO / "paper_assets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"PAPER_ASSETS_[A-Z0-9_]+", node.value):
                places.setdefault(node.value, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return [f"{name}: {', '.join(where)}" for name, where in sorted(places.items()) if len(where) > 1]


def history_mentions() -> list[str]:
    found = []
    for entry in TEXT_FILES:
        root = REPO / entry
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                       and p.suffix in (".py", ".md", ".sh", ".yaml", ".service", ""))
        for path in paths:
            if path.name == Path(__file__).name:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if HISTORY.search(line) and "start_new_session" not in line and 'scope="session"' not in line:
                    found.append(f"{path.relative_to(REPO)}:{number}")
    return found


def lines_of(name: str) -> int:
    return len((REPO / name).read_text(encoding="utf-8").splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args()
    checks = [
        (f"files in paper_assets/ over {MAX_FILE_LINES} lines", long_files()),
        (f"functions in paper_assets/ over {MAX_FUNCTION_LINES} lines", long_functions()),
        ("PAPER_ASSETS_* names defined in more than one place", settings_defined_more_than_once()),
        ("development history in the project's text", history_mentions()),
        (f"README.md over {MAX_README_LINES} lines", [] if lines_of("README.md") <= MAX_README_LINES
         else [f"{lines_of('README.md')} lines"]),
        (f"BENCHMARKS.md over {MAX_BENCHMARKS_LINES} lines", [] if lines_of("BENCHMARKS.md") <= MAX_BENCHMARKS_LINES
         else [f"{lines_of('BENCHMARKS.md')} lines"]),
    ]
    missed = 0
    for title, found in checks:
        print(f"{'met ' if not found else 'MISS'}  {title}: {len(found)}")
        for item in found:
            print(f"        {item}")
        missed += bool(found)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
