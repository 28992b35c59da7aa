"""The judge: every test cell's verdict decided apart from the student's code.

Under `nbgrader autograde` (tpgrader.preprocessors.judged_execute) the test cells run in the
grader's own process with the genuine checks, calling the student's functions in a sandboxed
process of their own (`student`, started and driven by `session`); what crosses between the
two is data only (`wire`). `notebook` walks a notebook's cells, `errors` rebuilds the student's
exceptions from data, `reach` flags solution cells that reach for the grader, `cells` is the
one reader of notebooks' nbgrader metadata, and `local` judges a notebook here and now, without
nbgrader or the sandbox (tests, an instructor's quick look).
"""
