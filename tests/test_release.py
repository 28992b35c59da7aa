"""release/ is what students receive: it must be nbgrader's output for the current source/
(regenerated with `make release`) and must not leak solutions or hidden tests."""
from __future__ import annotations

import json

import jupytext
import nbformat

import pytest

import assignments
from tpcourse import REPO, review_copy
from tpcourse.release import generate_release, release_files, source_assignments
from tpcourse.submissions import read

ASSIGNMENTS = source_assignments()
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS",
           "BEGIN MARK SCHEME", "END MARK SCHEME")
# What nbgrader puts in place of a solution (nbgrader_config.py and nbgrader's markdown stub).
# The assignments that must carry hidden tests say so in their metadata (SETTINGS).
HIDDEN_TESTS_REQUIRED = [a.name for a in assignments.discover() if a.settings.get("hidden_tests")]
MIN_SECRET_LEN = 8
STUB_LINES = {"# YOUR CODE HERE", "raise NotImplementedError()", "YOUR ANSWER HERE"}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    dest = tmp_path_factory.mktemp("release")
    generate_release(dest)
    return dest


def test_every_assignment_has_a_committed_release():
    committed = sorted(p.name for p in (REPO / "release").iterdir() if p.is_dir())
    assert ASSIGNMENTS, "no assignment notebooks in source/"
    assert committed == ASSIGNMENTS, (
        f"release/ holds {committed} but source/ has {ASSIGNMENTS}: run `make release`")


@pytest.mark.nbgrader
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_release_in_sync_with_source(regenerated, assignment):
    fresh = release_files(regenerated / assignment)
    committed = release_files(REPO / "release" / assignment)
    hint = "release/ is out of date with source/: run `make release` and commit release/"
    assert sorted(committed) == sorted(fresh), f"{assignment}: files differ. {hint}"
    for name, data in fresh.items():
        if name.endswith(".ipynb"):
            _assert_same_notebook(json.loads(data), json.loads(committed[name]),
                                  f"{assignment}/{name}", hint)
        else:
            assert committed[name] == data, f"{assignment}/{name} differs. {hint}"


def _assert_same_notebook(fresh: dict, committed: dict, where: str, hint: str):
    assert len(committed["cells"]) == len(fresh["cells"]), f"{where}: cell count differs. {hint}"
    for i, (want, got) in enumerate(zip(fresh["cells"], committed["cells"])):
        for key in ("cell_type", "source", "metadata", "outputs"):
            assert _text(got.get(key)) == _text(want.get(key)), (
                f"{where}: cell {i} ({want.get('metadata', {}).get('nbgrader', {}).get('grade_id')})"
                f" differs in {key}. {hint}")
    assert committed["metadata"] == fresh["metadata"], f"{where}: notebook metadata differs. {hint}"


def _text(value):
    # nbformat stores source either as a string or a list of lines; compare the text.
    return "".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) \
        else value


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_release_leaks_no_solution_or_hidden_test(assignment):
    sources = sorted((REPO / "source" / assignment).glob("*.ipynb"))
    assert sources
    for source_path in sources:
        source_nb = read(source_path)
        _, solution, hidden = _split_secret_lines(source_nb)
        assert solution, f"{source_path.name}: no solution lines found (markers missing?)"
        if assignment in HIDDEN_TESTS_REQUIRED:
            assert hidden, f"{source_path.name}: no hidden tests found"
        problems = _leaks(source_nb, read(REPO / "release" / assignment / source_path.name))
        assert not problems, f"release/{assignment}/{source_path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_leak_check_catches_a_source_notebook_shipped_as_release(assignment):
    # The check above can fail: shipping the instructor's notebook itself is caught.
    for source_path in sorted((REPO / "source" / assignment).glob("*.ipynb")):
        assert _leaks(read(source_path), read(source_path))


def _leaks(source_nb, release_nb) -> list[str]:
    """What the release notebook shows of the source's solutions and hidden tests."""
    _, solution, hidden = _split_secret_lines(source_nb)
    problems = []
    for i, cell in enumerate(release_nb.cells):
        where = f"cell {i} ({_gid(cell)})"
        problems += [f"{where}: marker '{m}'" for m in MARKERS if m in cell.source]
        leaked = [ln for ln in _lines(cell.source) if ln in solution | hidden]
        if leaked:
            problems.append(f"{where}: solution/hidden-test lines {leaked[:5]}")
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            problems.append(f"{where}: carries outputs")
    return problems


def _split_secret_lines(nb):
    """(public, solution, hidden) sets of stripped lines of a source notebook.

    Solution and hidden lines that also occur in a public place (prose, a signature outside the
    markers, a visible test) are not secrets; nbgrader's stubs are not either."""
    public, solution, hidden = set(), set(), set()
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        lines = cell.source.splitlines()
        if meta.get("solution") and not any("BEGIN SOLUTION" in ln for ln in lines):
            solution |= set(_lines(cell.source))  # nbgrader replaces the whole cell
            continue
        region = None
        for line in lines:
            if "BEGIN SOLUTION" in line or "BEGIN HIDDEN TESTS" in line:
                region = solution if "SOLUTION" in line else hidden
            elif "END SOLUTION" in line or "END HIDDEN TESTS" in line:
                region = None
            else:
                (region if region is not None else public).update(_lines(line))
    def secrets(lines):  # very short lines ("else:", "return y") say nothing about a solution
        return {ln for ln in lines - public - STUB_LINES if len(ln) >= MIN_SECRET_LEN}
    return public, secrets(solution), secrets(hidden)


def _lines(text: str):
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _gid(cell):
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


@pytest.mark.nbgrader
def test_sync_check_catches_an_edited_notebook(regenerated):
    # The comparison above can fail: a one-character edit of any cell is reported.
    name = ASSIGNMENTS[0]
    path = next((regenerated / name).glob("*.ipynb"))
    fresh = json.loads(path.read_bytes())
    edited = json.loads(path.read_bytes())
    edited["cells"][-1]["source"] = _text(edited["cells"][-1]["source"]) + " "
    with pytest.raises(AssertionError, match="differs in source"):
        _assert_same_notebook(fresh, edited, name, "")


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_the_release_states_everything_a_test_calls(assignment):
    """A student who follows the released text can earn every point: each name a test cell
    calls (hidden tests too) is defined or stubbed in the release, with the source's signature."""
    from tpcourse.release import unstated
    for path in sorted((REPO / "source" / assignment).glob("*.ipynb")):
        released = read(REPO / "release" / assignment / path.name)
        assert unstated(read(path), released) == [], f"{assignment}/{path.name}"


def test_every_source_notebook_has_a_current_review_copy():
    """assignments/<name>/notebook.pct.py is the notebook as text (make release rewrites it)."""
    assert review_copy.stale() == [], "run `make release`: the review copies are stale"
    for notebook, copy in review_copy.copies().items():
        text = copy.read_text()
        assert "# %% [markdown]" in text and "### BEGIN SOLUTION" in text, copy
        assert jupytext.reads(text, fmt=review_copy.FORMAT).cells[0].source == \
            nbformat.read(notebook, as_version=4).cells[0].source


def test_a_stale_review_copy_is_found(monkeypatch, tmp_path):
    notebook = assignments.discover()[0].notebook
    copy = tmp_path / review_copy.NAME
    copy.write_text(review_copy.text_of(notebook).replace("### END SOLUTION", "", 1))
    monkeypatch.setattr(review_copy, "copies", lambda: {notebook: copy})
    assert review_copy.stale() == [copy]
    assert review_copy.write() == [copy] and review_copy.stale() == []
