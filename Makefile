# One-command set-up and jobs. Every target builds the virtual environment first if needed.
#   make demo   - full nbgrader grading cycle on the embedded example students
#   make test   - the repository's test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv system demo test test-fast test-load release new-assignment bench bench-class grade gpu-check clean

venv: $(STAMP) system

# System packages for the grading sandbox (bubblewrap, prlimit/setpriv) and the Postgres
# gradebook test; idempotent, installs only what is missing (root, or sudo).
system:
	@bash .ci/setup-system.sh

# torch==2.13.0 is the CPU build on course machines; constraints.txt pins every transitive package.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import torch, nbgrader, numpy, tpsim"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m tpcourse.demo

# Two test processes (one per core); each module stays in one process (module-scoped courses).
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The inner loop (under a minute on 2 cores): the in-process checks of the numpy assignments and
# their catalogues, the judge, the wire, the layers' contracts, the unit tests. Not what CI runs.
# No system packages needed (nothing here starts a sandbox): it skips .ci/setup-system.sh.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The seven reference notebooks graded on a machine loaded 3 busy processes per core (about 9
# minutes on 2 cores; not part of `make test`, whose other tests it would slow as much).
test-load: venv
	TPCOURSE_LOAD_TEST=1 $(BIN)/python -m pytest -q -s tests/test_load.py

# Regenerate release/ from source/ with nbgrader (commit the result; a test checks it is in sync).
release: venv
	$(BIN)/python -m tpcourse.release

# Scaffold an assignment from the template: make new-assignment NAME=<name> writes
# assignments/<name>/ and source/<name>/<name>.ipynb only (docs/adding-an-assignment.md).
new-assignment: $(STAMP)
	$(BIN)/python -m tpcourse.new_assignment $(NAME)

bench: venv
	$(BIN)/python bench/autograde_bench.py
	$(BIN)/python bench/gpu_runner_bench.py

bench-class: venv
	$(BIN)/python bench/class_bench.py

# Grade a whole class: make grade ASSIGNMENT=<name> (sandboxed, parallel, resumable).
grade: venv
	$(BIN)/python -m tpcourse.grade_class $(ASSIGNMENT)

# On a GPU runner (installed as gpu_runner/README.md says, keeping its CUDA torch): CUDA and NCCL
# at world size 1 in the sandbox, the reference at full marks, two wrong example students losing
# their cells, then one line: gpu-check: PASS / FAIL. Without a GPU it says so and exits 77
# ("skipped"; make reports it as Error 77). Not part of `make test`. No venv rebuild here: it
# would install the CPU torch pin over the runner's CUDA one.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m tpcourse.gpu_check

clean:
	rm -rf $(VENV) demo_output bench_output
