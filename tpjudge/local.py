"""Judge a notebook here and now, without nbgrader and without the sandbox: for the repository's
tests and an instructor's quick look at what the judge makes of some answers. Real grading
always goes through `nbgrader autograde` (tpgrader.preprocessors.judged_execute), sandboxed.

    from tpjudge import local
    result = local.judge_answers(source_nb, {"sol_column_parallel": code})
    result.failed        # {test grade_id: the verdict's text}
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field

from . import notebook, session
from .cells import grade_id, is_solution, stub, strip_markers
from .settings import Judge


@dataclass
class Result:
    failed: dict = field(default_factory=dict)     # test grade_id -> what its outputs say
    outputs: dict = field(default_factory=dict)    # test grade_id -> its outputs


def with_answers(source_nb, answers=None, release=False):
    """The source notebook as autograde sees a submission: the solution cells replaced by
    `answers` (by grade_id), the others by the instructor's answer (or, with `release`, by the
    release's stub); the given cells and test cells as in the source."""
    nb = copy.deepcopy(source_nb)
    for cell in nb.cells:
        if cell.cell_type == "code" and is_solution(cell):
            gid = grade_id(cell)
            if answers and gid in answers:
                cell.source = answers[gid]
            else:
                cell.source = stub(cell.source) if release else strip_markers(cell.source)
    return nb


def judge(nb, timeout=30, time_limits=None, **settings) -> Result:
    """`timeout`: CPU seconds per cell; `time_limits`: a tpsandbox.TimeLimits (the stall and
    the wall-clock backstop); `settings`: other c.Judge settings."""
    config = Judge(timeout=timeout, **settings)
    with tempfile.TemporaryDirectory(prefix="tpjudge-local-") as workdir:
        verdicts = notebook.judge(
            nb, lambda: session.start(workdir, config, time_limits=time_limits),
            rerun=config.rerun_timeouts)
    result = Result()
    for index, outputs in verdicts.items():
        gid = grade_id(nb.cells[index])
        result.outputs[gid] = outputs
        bad = [o for o in outputs if o.output_type == "error"
               or (o.output_type == "stream" and o.name == "stderr")]
        if bad:
            result.failed[gid] = "\n".join(o.get("evalue") or o.get("text", "") for o in bad)
    return result


def judge_answers(source_nb, answers=None, release=False, **kwargs) -> Result:
    return judge(with_answers(source_nb, answers, release), **kwargs)
