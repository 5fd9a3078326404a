"""benchmarks/ keeps its map true: every script is on benchmarks/README.md, every study says
which question it answered and where the answer is, no experiment lives as a patch, and
the modules import each other without a circle. Reads files only; milliseconds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STUDIES = sorted((BENCH / "studies").glob("*.py"))


def _headings(markdown: str) -> list[str]:
    return [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_opens_with_its_question_and_where_the_answer_is(study):
    lines = study.read_text().splitlines()
    head = " ".join(line.lstrip("# ").strip() for line in
                    lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    match = re.match(r'Question: .+?\? Answer: BENCHMARKS\.md "([^"]+)"; (.+)$', head)
    assert match, (f"{study.name} must open with '# Question: ...?' and "
                   "'# Answer: BENCHMARKS.md \"Section\"; results/...' comment lines")
    section, where = match.groups()
    headings = _headings((ROOT / "BENCHMARKS.md").read_text())
    assert any(h.startswith(section) for h in headings), f"no BENCHMARKS.md section {section!r}"
    for pattern in re.findall(r"results/(\S+\.(?:json|png))", where):
        assert list((BENCH / "results").glob(pattern)), f"{study.name}: no results/{pattern}"


def test_the_map_names_every_script_and_no_patch_is_left():
    text = (BENCH / "README.md").read_text()
    scripts = [p for p in BENCH.rglob("*") if p.suffix in (".py", ".sh")
               and "__pycache__" not in p.parts and "results" not in p.parts]
    assert scripts
    missing = [str(p.relative_to(BENCH)) for p in scripts
               if f"`{p.relative_to(BENCH)}`" not in text and f"`{p.name}`" not in text]
    assert not missing, f"benchmarks/README.md does not name {missing}"
    assert not list(BENCH.rglob("*.diff")), "an experiment is either a config option or gone"


def _local_imports(path: Path, names: set[str]) -> set[str]:
    """The benchmark modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found & names


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in [*BENCH.glob("*.py"), *STUDIES]}
    return {name: _local_imports(path, set(modules)) for name, path in modules.items()}


def test_benchmark_modules_import_each_other_without_a_circle():
    graph = _graph()
    assert "gpu_check" not in graph["gpu_workers"]  # the circle there was

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack, node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)


def test_the_suite_and_the_gpu_check_never_import_a_study():
    graph, studies = _graph(), {p.stem for p in STUDIES}
    reached, todo = set(), ["run_all", "gpu_check"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += sorted(graph[name])
    assert not reached & studies, sorted(reached & studies)
