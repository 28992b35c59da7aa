"""What a person sees, in a real browser at 1366 x 768: headless Chromium and chromedriver from
Debian's packages (`.ci/setup-system.sh`), driven by selenium (pinned), nothing downloaded.

One small graded course in this module's temporary folder: the course's first numpy assignment
with its classic `bias_every_rank` mistake (autograded: kernel and judge), and its first torch
assignment reduced to its setup cell
and its gpu_* task cells, whose scores and comments are written straight into the gradebook
through gpu_runner.gradebook.write_scores (the runner itself is slow on gloo and tested
elsewhere), with a gpu report attached to the feedback. Then `jupyter lab` serves it on
127.0.0.1 and the browser looks at:

- the feedback page of the mistake: the failed check's explanation is the verdict the judge
  wrote, whole, wrapped, on screen, without sideways scrolling, at the top and in the cell;
- the torch assignment's feedback page: the failing gpu_* cell's comment and the gpu report's plot;
- the formgrader: the gpu_* scores and comments, and a markdown table whose cells do not run
  together;
- the student's notebook in JupyterLab after Run All: the self-check names the failed checks
  with the same messages as the grader;
- a second student of the first numpy assignment whose row_parallel cell writes markup (a script, a style that
  hides the summary, an overlay saying "All checks passed") into everything a cell can: what
  it prints and displays, JavaScript, an added markdown cell, and its exception's class name
  and message. On the feedback page and the formgrader's page of that submission nothing of it
  runs, and every check it lost is listed, on screen, with its lost points (issue 15).

The screenshots stay in the test's temporary folder (its path is printed).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By

import assignments
from tpcourse.catalogue import students
from tpcourse.submissions import Submission, build
from tpjudge.cells import gpu_cells, grade_id, is_given, is_self_check, read

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.nbgrader,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=(
        "Debian's chromium and chromium-driver are not installed and could not be "
        "(.ci/setup-system.sh installs them; `make test` runs it)")),
]

NUMPY = next(a.name for a in assignments.discover() if a.kind == "numpy")
TORCH = next(a.name for a in assignments.discover() if a.has_gpu)
BIAS_EVERY_RANK = next(s for s in students(NUMPY) if s.student == "bias_every_rank")
STUDENT = BIAS_EVERY_RANK.student
DEFACER = "defacer"
# What the defacing student writes everywhere: it would set window.tpInjected and the title,
# hide the summary and the lost points, and lay "All checks passed" over the page.
MARKUP = ("<script>window.tpInjected = 'script'; document.title = 'defaced'</script>"
          "<style>.tp-summary, .tp-failed, .tp-lost, #toc { display: none !important }</style>"
          "<img src=x onerror=\"window.tpInjected = 'img'; document.title = 'defaced'\">"
          "</div></div></div><div class='navbar-fixed-top' style='height: 100vh; "
          "background: white; z-index: 99999'>All checks passed: 99/99</div>")
DEFACING_ROW_PARALLEL = f"""
from IPython.display import HTML, Javascript, display
MARKUP = {MARKUP!r}
print(MARKUP)
display(HTML(MARKUP))
display(Javascript("window.tpInjected = 'javascript'; document.title = 'defaced'"))
raise type(MARKUP, (Exception,), {{}})(MARKUP + "\x1b[37;47m the rest in white on white")
"""
WIDTH, HEIGHT = 1366, 768
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage")
# What the gpu_runner would have written for a row layer that adds its bias on every rank.
GPU_SCORES = {
    "gpu_row_forward": (1.0, "gpu_runner (gloo, world sizes 1, 2, 3, 4): 2/8 checks passed. Failed:\n"
                             "- row.forward@2: rank 0 of 2: max abs error 2.49: the bias is counted "
                             "2 times (added on every rank before the all-reduce?)\n"
                             "- row.full@2: rank 1 of 2: max abs error 2.49"),
    "gpu_mlp_forward": (0.0, "gpu_runner (gloo, world sizes 1, 2, 3, 4): 0/4 checks passed. Failed:\n"
                             "- mlp.forward@2: rank 0 of 2: max abs error 1.3"),
}


# -- the course -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def course(make_course):
    course = make_course("browser", assignments=[NUMPY, TORCH])
    _reduce_torch_notebook(course.root / "source" / TORCH / f"{TORCH}.ipynb")
    course.generate("*")
    source, release = course.root / "source", course.root / "release"
    notebooks = build(BIAS_EVERY_RANK, source, release)
    course.place_submission(STUDENT, NUMPY, notebooks)
    defacing = build(Submission(DEFACER, NUMPY, {
        NUMPY: {"sol_row_parallel": DEFACING_ROW_PARALLEL}}), source, release)
    from nbformat.v4 import new_markdown_cell
    defacing[f"{NUMPY}.ipynb"].cells.insert(2, new_markdown_cell(f"A note.\n\n{MARKUP}"))
    course.place_submission(DEFACER, NUMPY, defacing)
    work = course.student_home(STUDENT) / NUMPY     # what the student has open
    work.mkdir(parents=True)
    import nbformat
    for name, nb in notebooks.items():
        nbformat.write(nb, str(work / name))
    course.place_submission(STUDENT, TORCH,
                            {p.name: read(p) for p in (release / TORCH).glob("*.ipynb")})
    course.name_students({STUDENT: ("Example", "Bias Every Rank")})
    course.autograde("*")
    from gpu_runner.gradebook import write_scores
    cells = gpu_cells(read(source / TORCH / f"{TORCH}.ipynb"))
    scores = {gid: GPU_SCORES.get(gid, (points, "gpu_runner: all checks passed."))
              for gid, points in cells.items()}
    write_scores(course.db_url, TORCH, TORCH, STUDENT, scores)
    _fake_gpu_report(course.root / "gpu_reports" / TORCH / STUDENT, scores, cells)
    course.generate_feedback("*")
    from tpgrader.classgrade.gpu_feedback import attach
    assert attach(course.root, TORCH) == [STUDENT]
    return course


def _reduce_torch_notebook(path):
    """The torch notebook with its first two text cells (a markdown table), the setup cell and the
    gpu_* task cells: a quick autograde, the same gradebook cells the gpu_runner scores."""
    import nbformat
    nb = read(path)
    keep = nb.cells[:2] + [c for c in nb.cells if is_given(c) or grade_id(c) in gpu_cells(nb)]
    nb.cells = keep
    nbformat.write(nb, str(path))


def _fake_gpu_report(folder, scores, cells):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(["1", "2", "3", "4"], [1.0, 1.4, 1.7, 2.1], label="compute")
    ax.bar(["1", "2", "3", "4"], [0.0, 0.8, 1.1, 1.5], bottom=[1.0, 1.4, 1.7, 2.1], label="comm")
    ax.legend()
    fig.savefig(folder / "timing.png", dpi=80)
    plt.close(fig)
    (folder / "report.json").write_text(json.dumps({
        "student": STUDENT, "assignment": TORCH, "notebook": TORCH, "backend": "gloo",
        "world_sizes": [1, 2, 3, 4], "score": sum(s for s, _ in scores.values()),
        "max_score": sum(cells.values()), "faults": [],
        "cells": {g: {"score": s, "comment": c} for g, (s, c) in scores.items()}}))


def _verdict(course, assignment, gid) -> str:
    """What the grader wrote for a test cell: its error's type and whole message."""
    nb = read(course.root / "autograded" / STUDENT / assignment / f"{assignment}.ipynb")
    [cell] = [c for c in nb.cells if grade_id(c) == gid]
    [error] = [o for o in cell.outputs if o.output_type == "error"]
    return f"{error.ename}: {error.evalue}"


# -- JupyterLab and the browser ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(course, tmp_path_factory):
    """`jupyter lab` on 127.0.0.1 in the course root, with a Jupyter home of its own."""
    home = tmp_path_factory.mktemp("jupyter-home")
    token = "tp-browser-test"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    # JupyterLab asks whether to fetch Jupyter's news: answer no (nothing leaves the machine).
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log = open(home / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={course.root}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=course.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("jupyter lab did not start:\n"
                                       + (home / "jupyter.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"base": base, "token": token, "log": home / "jupyter.log"}
    finally:
        _stop(proc)
        log.close()


def _stop(proc):
    """The server and what it started (its kernels: the same session), by process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """Chromium, logged in to the server (the token sets the login cookie that the
    formgrader's own API calls need)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(90)
    shots = tmp_path_factory.mktemp("screenshots")
    driver.shot = lambda name: driver.save_screenshot(str(shots / f"{name}.png"))
    print(f"\nscreenshots: {shots}")
    driver.get(f"{server['base']}/lab?token={server['token']}")
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, server, path):
    sep = "&" if "?" in path else "?"
    driver.get(f"{server['base']}/{path}{sep}token={server['token']}")


def _wait(driver, what, timeout=60, every=0.5):
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what.__doc__}")
        time.sleep(every)


_GEOMETRY = """
const el = arguments[0];
const r = el.getBoundingClientRect();
return {scrollWidth: el.scrollWidth, clientWidth: el.clientWidth, left: r.left, right: r.right,
        top: r.top, bottom: r.bottom, innerWidth: window.innerWidth,
        innerHeight: window.innerHeight, text: el.innerText,
        pageWidth: document.documentElement.scrollWidth};"""


def _on_screen_whole(driver, element) -> dict:
    """Scroll `element` into view and check that all of it is on screen, unclipped."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    g = driver.execute_script(_GEOMETRY, element)
    assert g["scrollWidth"] <= g["clientWidth"], f"scrolls sideways: {g}"
    assert 0 <= g["left"] and g["right"] <= g["innerWidth"], f"not within the window's width: {g}"
    assert 0 <= g["top"] and g["bottom"] <= g["innerHeight"], f"not on screen: {g}"
    return g


def _words(text) -> str:
    return " ".join(text.split())


# -- the tests --------------------------------------------------------------------------------
def test_feedback_shows_the_failed_checks_explanation_whole_and_wrapped(course, server, browser):
    _open(browser, server, f"files/feedback/{STUDENT}/{NUMPY}/{NUMPY}.html")
    for gid in BIAS_EVERY_RANK.loses:           # test_row_bias_once, test_row_bias_after_reduce
        verdict = _verdict(course, NUMPY, gid)
        summary = browser.find_element(
            By.CSS_SELECTOR, f'li.tp-check[data-grade-id="{gid}"] .tp-explanation')
        g = _on_screen_whole(browser, summary)
        assert _words(g["text"]) == _words(verdict)
        browser.shot(f"feedback-summary-{gid}")
        in_cell = browser.find_element(
            By.XPATH, f"//a[@name='{gid}']/following::pre[contains(@class,'tp-verdict')][1]")
        g = _on_screen_whole(browser, in_cell)
        assert _words(g["text"]) == _words(verdict)
        browser.shot(f"feedback-cell-{gid}")
    assert g["pageWidth"] <= WIDTH, "the feedback page scrolls sideways"
    listed = [e.get_attribute("data-grade-id")
              for e in browser.find_elements(By.CSS_SELECTOR, "li.tp-check")]
    assert sorted(listed) == sorted(BIAS_EVERY_RANK.loses)
    toc = browser.find_element(By.ID, "toc").text
    assert "Test cell" not in toc and "test_row_bias_once: the bias is counted exactly once" in toc


def test_feedback_shows_a_failing_gpu_cell_and_the_gpu_report(course, server, browser):
    _open(browser, server, f"files/feedback/{STUDENT}/{TORCH}/{TORCH}.html")
    summary = browser.find_element(
        By.CSS_SELECTOR, 'li.tp-check[data-grade-id="gpu_row_forward"] .tp-explanation')
    g = _on_screen_whole(browser, summary)
    assert _words(g["text"]) == _words(GPU_SCORES["gpu_row_forward"][1])
    browser.shot("feedback-gpu-summary")
    plot = browser.find_element(By.CSS_SELECTOR, ".tp-gpu-report img")
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 0
    _on_screen_whole(browser, plot)
    browser.shot("feedback-gpu-report")
    comment = browser.find_element(
        By.XPATH, "//a[@name='comment-gpu_row_forward']/following::div[contains(@class,"
                  "'panel-footer')][1]")
    g = _on_screen_whole(browser, comment)
    assert "row.forward@2: rank 0 of 2: max abs error 2.49" in g["text"]
    browser.shot("feedback-gpu-cell")
    assert (course.root / "feedback" / STUDENT / TORCH / "gpu_report" / "timing.png").is_file()


def test_formgrader_shows_gpu_scores_comments_and_readable_tables(course, server, browser):
    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:
        sub_id = gb.find_submission_notebook(TORCH, TORCH, STUDENT).id
    _open(browser, server, f"formgrader/submissions/{sub_id}/")

    def filled():
        """the formgrader to fill in the scores"""
        return browser.execute_script(
            "const e = document.getElementById('gpu_row_forward'); return e && e.value;")
    _wait(browser, filled)
    for gid, (score, comment) in GPU_SCORES.items():
        box = browser.find_element(By.ID, gid)
        assert float(box.get_attribute("value")) == score
        assert browser.find_element(By.ID, f"{gid}-comment").get_attribute("value") == comment
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                           browser.find_element(By.ID, "gpu_row_forward"))
    browser.shot("formgrader-gpu-cells")
    # The markdown table of the text: each cell padded, "computes on" and "its own part of
    # the batch" apart (without the course's CSS they ran together: "onits own part").
    cell = browser.find_element(By.XPATH, "//td[normalize-space()='its own part of the batch']")
    left = browser.find_element(By.XPATH, "//td[normalize-space()='each rank computes on']")
    gap = browser.execute_script("""
        const text = el => { const r = document.createRange(); r.selectNodeContents(el);
                             return r.getBoundingClientRect(); };
        return text(arguments[1]).left - text(arguments[0]).right;""", left, cell)
    assert gap >= 8, f"the table's cells run together ({gap:.1f} px between them)"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    browser.shot("formgrader-table")
    # The configuration panel names the course's plug-ins (it showed "[, , , ...]": the reprs
    # of classes, "<class ...>", read as HTML tags), and is JSON: the whole config serialises,
    # the server's extension list included (jupyter_server keeps it as a LazyConfigValue,
    # which tpgrader.configure states as data), so the formgrader logs no warning.
    _open(browser, server, "formgrader/manage_assignments")
    panel = browser.find_element(By.CSS_SELECTOR, "#collapseConfig pre").get_attribute("textContent")
    shown = json.loads(panel)
    for section, name in (("Autograde", "autograde_preprocessors"),
                          ("GenerateFeedback", "preprocessors"),
                          ("GenerateAssignment", "preprocessors")):
        assert any(e.startswith("tpgrader.") for e in shown[section][name]), shown[section]
    assert "not serializable" not in server["log"].read_text()


def test_the_students_self_check_names_the_mistake_like_the_grader(course, server, browser):
    _open(browser, server, f"lab/tree/students/{STUDENT}/{NUMPY}/{NUMPY}.ipynb")

    def idle():
        """the notebook's kernel to be idle"""
        return browser.execute_script(
            "const e = document.querySelector('.jp-Notebook-ExecutionIndicator');"
            "return e && e.getAttribute('data-status') === 'idle';")
    _wait(browser, idle, timeout=90)
    browser.find_element(By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel')]"
                                   "[normalize-space()='Run']").click()
    browser.find_element(By.XPATH, "//div[contains(@class,'lm-Menu-itemLabel')]"
                                   "[normalize-space()='Run All Cells']").click()

    def report():
        """the row_parallel self-check's report"""
        for out in browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output pre"):
            if "Self-check of row_parallel" in out.text:
                return out
        return None
    out = _wait(browser, report, timeout=120)
    g = _on_screen_whole(browser, out)
    text = _words(g["text"])
    browser.shot("jupyterlab-self-check")
    assert "2 of 11 checks FAIL" in text
    for gid in BIAS_EVERY_RANK.loses:
        assert f"FAILED {gid} (hidden test): {_words(_verdict(course, NUMPY, gid))}" in text
    # The diagrams fit: the column-parallel one, drawn in 80 columns, whole on screen with the
    # file browser open.
    diagram = browser.find_element(
        By.XPATH, "//div[contains(@class,'jp-RenderedMarkdown')]//pre"
                  "[contains(., 'concatenated on the last axis')]")
    _on_screen_whole(browser, diagram)
    browser.shot("jupyterlab-diagram")
    # The self-check cells themselves are not part of any grade: the grader left them unrun.
    graded = read(course.root / "autograded" / STUDENT / NUMPY / f"{NUMPY}.ipynb")
    assert all(not c.outputs for c in graded.cells if is_self_check(c))


def _grades(course, student, assignment) -> dict:
    """{grade_id: (score, max score)} of every graded cell, from the gradebook."""
    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:
        nb = gb.find_submission_notebook(assignment, assignment, student)
        return {g.name: (g.score, g.max_score) for g in nb.grades}


def _nothing_ran(driver):
    time.sleep(1)               # an <img onerror> fires after the load
    assert driver.execute_script("return window.tpInjected === undefined"), \
        driver.execute_script("return window.tpInjected")
    assert "defaced" not in driver.title
    assert not driver.find_elements(By.CSS_SELECTOR, "div.navbar-fixed-top")


_UNCOVERED = """
const el = arguments[0]; const r = el.getBoundingClientRect();
const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
return top === el || el.contains(top);"""


def test_a_defacing_submission_runs_nothing_and_hides_no_lost_point(course, server, browser):
    grades = _grades(course, DEFACER, NUMPY)
    lost = {gid: (score, top) for gid, (score, top) in grades.items() if score < top}
    assert "test_row_small" in lost          # its row_parallel raised: the row checks lost
    _open(browser, server, f"files/feedback/{DEFACER}/{NUMPY}/{NUMPY}.html")
    _nothing_ran(browser)
    header = browser.find_element(By.XPATH, "//h5[starts-with(., 'What to fix')]")
    assert _words(_on_screen_whole(browser, header)["text"]) == \
        f"What to fix: {len(lost)} of {len(grades)} checks lost points"
    items = browser.find_elements(By.CSS_SELECTOR, "li.tp-check")
    assert sorted(e.get_attribute("data-grade-id") for e in items) == sorted(lost)
    for item in items:
        score, points = lost[item.get_attribute("data-grade-id")]
        badge = item.find_element(By.CSS_SELECTOR, ".tp-lost")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", badge)
        assert badge.is_displayed() and browser.execute_script(_UNCOVERED, badge), badge.text
        assert badge.text == f"(Score: {score:g} / {points:g})"
    browser.shot("feedback-defacer-summary")
    # what the cell printed and raised, shown as text: the markup itself, the class name too
    verdict = browser.find_element(
        By.XPATH, "//pre[contains(@class,'tp-verdict')][contains(., 'All checks passed')]")
    assert _words(_on_screen_whole(browser, verdict)["text"]).startswith(_words(MARKUP) + ":")
    assert browser.find_elements(
        By.XPATH, "//div[contains(@class,'output_stdout')]//pre[contains(., '<script>')]")
    browser.shot("feedback-defacer-cell")
    from nbgrader.api import Gradebook
    with Gradebook(course.db_url) as gb:
        sub_id = gb.find_submission_notebook(NUMPY, NUMPY, DEFACER).id
    _open(browser, server, f"formgrader/submissions/{sub_id}/")
    _wait(browser, lambda: browser.execute_script(
        "return document.readyState === 'complete'"))
    _nothing_ran(browser)
    browser.shot("formgrader-defacer")
