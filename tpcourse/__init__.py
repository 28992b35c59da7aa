"""Instructor-side tooling for the tensor-parallelism course: the nbgrader cycle driver,
example submissions and their grade tables, the demo, class-wide grading and the GPU runner's
check. The assignments themselves are found through the registry (`assignments`)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
