"""The torch versions the gpu_runner was tested with, and the check it makes at start.

A grade is computed against trusted references run by the same torch, so another version may
well grade correctly; but what the runner relies on has changed between torch releases before:
the profiler's backend event names (collective counts), the process-group API, torchrun's
flags. A version outside the tested series is used anyway, with a warning that names them.

    python -m gpu_runner.versions [--expect-gpus N]   # torch, CUDA, GPUs, tested or not
"""
from __future__ import annotations

import argparse
import os
import sys

# major.minor series -> what ran on it. Add a series after `make test` (and, on a GPU runner,
# `python -m gpu_runner.grade` with --backend nccl on the example class) passes with it.
TESTED_TORCH = {
    "2.13": "2.13.0 CPU build: the repository's test suite on gloo ranks (NCCL on GPUs: not yet)",
}


def torch_version() -> str | None:
    """The installed torch's version, read without importing torch (seconds, on CUDA)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def series(version: str) -> str:
    """'2.13.0+cu128' -> '2.13'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def warning(version: str | None) -> str:
    """'' for a tested torch, else what to say."""
    tested = ", ".join(f"{s}.x" for s in TESTED_TORCH)
    if version is None:
        return f"torch is not installed (tested: {tested})"
    if series(version) in TESTED_TORCH:
        return ""
    return (f"torch {version} is not a tested version (tested: {tested}; "
            "gpu_runner/versions.py): grading goes ahead, check a known class first")


def warn_if_untested(stream=None) -> str:
    """Called at the start of `python -m gpu_runner.grade`: print the warning, if any."""
    text = warning(torch_version())
    if text:
        prefix = "::warning::" if os.environ.get("GITHUB_ACTIONS") == "true" else ""
        print(f"{prefix}gpu_runner: WARNING: {text}", file=stream or sys.stderr, flush=True)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu_runner.versions", description=__doc__)
    ap.add_argument("--expect-gpus", type=int, default=0,
                    help="warn when the machine has fewer GPUs (it then grades on gloo)")
    args = ap.parse_args(argv)
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpus} GPU(s), Python "
          f"{sys.version.split()[0]}; tested: "
          + "; ".join(f"{s}.x: {what}" for s, what in TESTED_TORCH.items()))
    warn_if_untested(sys.stdout)
    if gpus < args.expect_gpus:
        prefix = "::warning::" if os.environ.get("GITHUB_ACTIONS") == "true" else ""
        print(f"{prefix}gpu_runner: WARNING: {gpus} GPU(s), {args.expect_gpus} expected: "
              "`--backend auto` then grades on gloo (the same grades, slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
