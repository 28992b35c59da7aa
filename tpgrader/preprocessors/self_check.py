"""Write the self-check cells of a release (nbgrader generate_assignment).

In the instructor's notebook a self-check cell is one short line after an exercise's test
cells, naming the exercise's solution cell (no nbgrader metadata):

    tpgrade.selfcheck.run("sol_row_parallel")

Here, before ClearHiddenTests removes them, it becomes the full list the student can run:
every test cell that calls a name the solution cell defines, in notebook order, with the code
the grader runs for it (hidden parts included), and which of them are hidden tests
(tpgrade.selfcheck runs it). The cell is read-only in JupyterLab and changes no grade: it is
not an nbgrader cell, and grading never runs it (tpgrader.preprocessors.judged_execute).

`c.SelfCheck.hidden_tests = False` (read here, at release time) keeps hidden tests hidden: the
cell then lists the visible tests only and says how many hidden tests it does not run.
"""
from __future__ import annotations

import ast
import textwrap

from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor
from traitlets import Bool

from tpjudge.cells import (defined_names, free_names, gpu_cells, grade_id, is_self_check,
                           is_solution, is_test, without_magics)

WIDTH = 79


class SelfCheckError(ValueError):
    """A self-check cell of the instructor's notebook that cannot be written."""


class SelfCheck(NbGraderPreprocessor):

    hidden_tests = Bool(True, help=(
        "Whether the self-check cells run the hidden tests too (True: the student can run "
        "every check the grader runs before submitting; False: hidden tests stay hidden and "
        "the cell says they were not run).")).tag(config=True)

    def preprocess(self, nb, resources):
        markers = ClearHiddenTests(parent=self)
        exercises = {grade_id(c): c for c in nb.cells if c.cell_type == "code" and is_solution(c)}
        tests = [c for c in nb.cells if is_test(c)]
        self.graded_elsewhere = gpu_cells(nb)
        for cell in nb.cells:
            if is_self_check(cell):
                solution = _exercise(cell.source)
                if solution not in exercises:
                    raise SelfCheckError(f"self-check cell: no solution cell {solution!r} "
                                         f"(solution cells: {sorted(exercises)})")
                cell.source = self.cell_source(exercises[solution], tests, markers)
                cell.metadata["editable"] = False
                cell.metadata["deletable"] = False
        return nb, resources

    def cell_source(self, solution, tests, markers) -> str:
        names = defined_names(solution.source)
        mine = [t for t in tests if free_names(t.source) & set(names)]
        if not mine:
            raise SelfCheckError(f"self-check of {grade_id(solution)}: no test cell calls "
                                 f"{', '.join(names) or 'anything it defines'}")
        called = [n for n in names if any(n in free_names(t.source) for t in mine)]
        # the report's name for the exercise: its functions, or its cell when they are many
        short = ", ".join(called) if len(called) <= 2 else grade_id(solution)
        hidden = [grade_id(t) for t in mine if markers.begin_test_delimeter in t.source]
        run = [t for t in mine if self.hidden_tests or grade_id(t) not in hidden]
        checks = {grade_id(t): _code(t.source) for t in run}
        comment = _comment(", ".join(called), len(run), len(hidden), self.hidden_tests)
        if self.graded_elsewhere:
            points = sum(self.graded_elsewhere.values())
            comment += _wrapped(f"The {len(self.graded_elsewhere)} gpu_* cells ({points:g} "
                                f"points) are graded on real ranks by the gpu_runner when the "
                                f"course grades; this cell does not run them.", "# ")
        return "\n".join(comment + _call(short, checks, hidden if self.hidden_tests else [],
                                         0 if self.hidden_tests else len(hidden)))


def _exercise(source: str) -> str:
    """The solution cell's grade_id named by `tpgrade.selfcheck.run("sol_...")`."""
    try:
        call = ast.parse(without_magics(source)).body[-1].value
        return ast.literal_eval(call.args[0])
    except (SyntaxError, IndexError, AttributeError, ValueError) as exc:
        raise SelfCheckError(f"a self-check cell must be tpgrade.selfcheck.run(\"<solution "
                             f"cell grade_id>\"), got {source!r}") from exc


def _code(source: str) -> str:
    """A test cell's code as the grader runs it: marker and comment lines dropped, simple
    statements joined on one line."""
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if all(not ln[:1].isspace() for ln in lines):
        return "; ".join(ln.strip() for ln in lines)
    return "\n".join(lines)


def _comment(label, run, hidden, with_hidden) -> list[str]:
    if with_hidden:
        what = (f"the grader's {run} checks of {label} ({hidden} of them hidden tests)"
                if hidden else f"the grader's {run} checks of {label}")
        text = (f"Self-check (not graded; it changes no grade): runs {what} on your code as "
                f"it is now, and names each check that fails, with its message.")
    else:
        text = (f"Self-check (not graded; it changes no grade): runs the {run} visible tests "
                f"of {label} on your code as it is now. The course keeps its {hidden} hidden "
                f"tests hidden: they are NOT run here.")
    return _wrapped(text, "# ")


def _call(label, checks, hidden, hidden_not_run) -> list[str]:
    lines = [f"tpgrade.selfcheck.run({label!r}, {{"]
    for gid, code in checks.items():
        lines += [f"    {gid!r}:", f"        {code!r},"]
    tail = "}"
    if hidden:
        lines.append(tail + ", hidden=[")
        lines += _wrapped(", ".join(repr(g) for g in hidden) + ",", "    ")
        tail = "]"
    if hidden_not_run:
        tail += f", hidden_not_run={hidden_not_run}"
    lines.append(tail + ")")
    return lines


def _wrapped(text, prefix) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=prefix, subsequent_indent=prefix,
                         break_long_words=False, break_on_hyphens=False)
