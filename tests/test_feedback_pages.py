"""The nbgrader plug-ins behind the pages people read (fast, in-process): tpgrader.configure's
config (serialisable, resolvable), the feedback summary's data, and the gpu report attached to
the feedback. What the pages look like in a browser: test_browser.py; generate_feedback on the
whole catalogue: test_course_cycle.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from traitlets.config import Config
from traitlets.utils.importstring import import_item

import tpgrader
from tpconfig import load_config
from tpcourse import REPO
from tpgrader.classgrade import gpu_feedback
from tpgrader.preprocessors.feedback_summary import FeedbackSummary


def _configured() -> Config:
    c = Config()
    tpgrader.configure(c)
    return c


def test_the_course_config_serialises_and_nbgrader_can_import_every_entry():
    c = load_config(str(REPO))
    json.dumps(c)        # the formgrader shows it as JSON ("Formgrader config is not serializable")
    for section, name in [("Autograde", "autograde_preprocessors"),
                          ("GenerateAssignment", "preprocessors"),
                          ("GenerateFeedback", "preprocessors")]:
        entries = c[section][name]
        assert entries and all(isinstance(e, str) for e in entries)
        for entry in entries:
            import_item(entry)
    import_item(c.GenerateFeedback.exporter_class)
    for entry in c.HTMLExporter.filters.values():     # the pages' markdown filter
        import_item(entry)


_FORMGRADER_PANEL = """
import json
from jupyter_server.serverapp import ServerApp
from nbgrader.server_extensions.formgrader.formgrader import FormgradeExtension
server = ServerApp.instance()
server.initialize(argv=["--allow-root", "--port=0", "--ServerApp.open_browser=False"])
formgrader = FormgradeExtension(parent=server)
formgrader.initialize([])       # what the formgrader does on a page load: reads nbgrader_config.py
print(json.dumps(formgrader.config))
"""


@pytest.mark.slow                  # starts a Jupyter server
def test_the_formgrader_config_serialises_inside_a_jupyter_server(tmp_path):
    # What the formgrader's configuration panel shows: the server's config (jupyter_server
    # leaves a LazyConfigValue in it) merged with the course's nbgrader_config.py.
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(REPO / "nbgrader_config.py", course)
    env = {**os.environ, "HOME": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _FORMGRADER_PANEL], cwd=course, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads(run.stdout.strip().splitlines()[-1])
    assert config["ServerApp"]["jpserver_extensions"]["nbgrader.server_extensions.formgrader"]
    assert config["Autograde"]["autograde_preprocessors"]


def test_configure_puts_the_course_in_nbgrader_pipelines_once():
    from nbgrader.converters import Autograde, GenerateAssignment
    c = _configured()
    tpgrader.configure(c)                       # twice: still one of each
    autograde = c.Autograde.autograde_preprocessors
    assert len(autograde) == len(Autograde.autograde_preprocessors.default()) + 1
    assert "nbgrader.preprocessors.execute.Execute" not in autograde
    assert autograde.index(tpgrader.FLAGS) == \
        autograde.index("nbgrader.preprocessors.saveautogrades.SaveAutoGrades") + 1
    assert autograde.count(tpgrader.JUDGED_EXECUTE) == 1
    generate = c.GenerateAssignment.preprocessors
    assert len(generate) == len(GenerateAssignment.preprocessors.default()) + 1
    assert generate.index(tpgrader.SELF_CHECK) + 1 == \
        generate.index("nbgrader.preprocessors.clearhiddentests.ClearHiddenTests")
    feedback = c.GenerateFeedback.preprocessors
    assert feedback.index(tpgrader.FEEDBACK_SUMMARY) == \
        feedback.index("nbgrader.preprocessors.getgrades.GetGrades") + 1
    assert c.HTMLExporter.extra_template_paths.count(c.HTMLExporter.extra_template_paths[-1]) == 1


def _graded(cell, score, points, **extra):
    cell.metadata["nbgrader"] = {"grade_id": extra.pop("gid"), "points": points,
                                 "score": score, **extra}
    return cell


def test_the_summary_names_each_check_and_explains_each_failed_one():
    verdict = "row_parallel(x (5, 24), ...): the bias was added 2 times"
    internal = '  File "/site/tpgrade/linear.py", line 12, in row_bias_once\n    fail(...)\n'
    own = '  File "<sol_row_parallel>", line 3, in row_parallel\n'
    failing = new_code_cell("# Hidden test: the bias is counted exactly once\n"
                            "### BEGIN HIDDEN TESTS\ncheck.row_bias_once(row_parallel)")
    failing.outputs = [new_output("error", ename="CheckFailed", evalue=verdict,
                                  traceback=["Traceback:", own, internal,
                                             f"\x1b[31mCheckFailed\x1b[0m: {verdict}"])]
    noisy = new_code_cell("# ok\ncheck.x(f)")
    noisy.outputs = [new_output("stream", name="stderr", text="careful\n")]
    nb = new_notebook(cells=[
        _graded(failing, 0, 1, gid="test_row_bias_once", grade=True),
        _graded(new_code_cell("# 2 ranks: the output\ncheck.row_small(row_parallel)"), 1, 1,
                gid="test_row_small", grade=True),
        _graded(noisy, 0, 1, gid="test_noisy", grade=True),
        _graded(new_markdown_cell("### `RowParallelLinear` forward (`gpu_row_forward`, 3 "
                                  "points, graded on real ranks)\n\ntext"), 1, 3,
                gid="gpu_row_forward", task=True, comment="- row.forward@2: max abs error 2.49"),
    ])
    nb, resources = FeedbackSummary().preprocess(nb, {})
    checks = {c["grade_id"]: c for c in resources["tp_feedback"]["checks"]}
    assert list(checks) == ["test_row_bias_once", "test_row_small", "test_noisy", "gpu_row_forward"]
    assert checks["test_row_bias_once"]["title"] == "the bias is counted exactly once"
    assert checks["test_row_bias_once"]["explanation"] == f"CheckFailed: {verdict}"
    assert checks["test_row_small"]["title"] == "2 ranks: the output"
    assert not checks["test_row_small"]["failed"] and not checks["test_row_small"]["explanation"]
    assert checks["test_noisy"]["explanation"].endswith("careful")
    gpu = checks["gpu_row_forward"]
    assert (gpu["title"], gpu["anchor"], gpu["score_text"], gpu["points_text"]) == \
        ("RowParallelLinear forward", "comment-gpu_row_forward", "1", "3")
    assert gpu["explanation"] == "- row.forward@2: max abs error 2.49"
    # the student's own frame stays, the grader's goes
    assert nb.cells[0].outputs[0].traceback == ["Traceback:", own,
                                               f"\x1b[31mCheckFailed\x1b[0m: {verdict}"]
    assert any("tpgrader: feedback" in css for css in resources["inlining"]["css"])


def _report_folder(root, student):
    folder = root / "gpu_reports" / "hw_torch" / student
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({
        "student": student, "notebook": "hw_torch", "backend": "gloo", "world_sizes": [1, 2],
        "score": 20, "max_score": 24, "faults": [{"unit": "mlp.forward@2", "reason": "deadlock"}]}))
    (folder / "timing.png").write_bytes(b"\x89PNG fake")
    return folder


def test_the_gpu_report_goes_into_the_feedback_folder_and_page(tmp_path):
    _report_folder(tmp_path, "ada")
    _report_folder(tmp_path, "bob")              # no feedback yet: left alone
    feedback = tmp_path / "feedback" / "ada" / "hw_torch"
    feedback.mkdir(parents=True)
    page = feedback / "hw_torch.html"
    page.write_text(f"<body><h4>hw_torch</h4>{gpu_feedback.BEGIN}{gpu_feedback.END}<p>cells</p>"
                    "</body>")
    assert gpu_feedback.attach(tmp_path, "hw_torch") == ["ada"]
    assert sorted(p.name for p in (feedback / "gpu_report").iterdir()) == ["report.json",
                                                                          "timing.png"]
    once = page.read_text()
    assert "20 / 24" in once and "mlp.forward@2: deadlock" in once
    assert "data:image/png;base64," in once and once.index("hw_torch</h4>") < once.index("<img")
    gpu_feedback.attach(tmp_path, "hw_torch")    # again: replaced, not added
    assert page.read_text() == once
    assert not (tmp_path / "feedback" / "bob").exists()


def test_a_page_without_the_marker_gets_the_report_before_its_end():
    page = gpu_feedback.with_section("<body><p>x</p></body>", "REPORT")
    assert page == "<body><p>x</p>REPORT\n</body>"
