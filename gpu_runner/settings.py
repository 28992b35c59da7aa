"""The gpu_runner's course settings, from nbgrader_config.py as `c.GpuRunner.<name> = value`.

They are the course's, not the machine's: every grading machine reads the same file, so every
machine grades the same checks for the same points.
"""
from __future__ import annotations

from traitlets import Integer, List, TraitError, validate
from traitlets.config import Configurable


class GpuRunner(Configurable):
    world_sizes = List(Integer(), default_value=[1, 2, 3, 4], help=(
        "The world sizes every submission of a torch assignment is graded at (one torchrun "
        "launch of max(world_sizes) ranks; the smaller sizes run on sub-groups). The same on every "
        "machine: NCCL is used only where there are at least max(world_sizes) GPUs, gloo on "
        "CPU otherwise.")).tag(config=True)

    @validate("world_sizes")
    def _positive(self, proposal):
        sizes = proposal["value"]
        if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise TraitError(f"c.GpuRunner.world_sizes must be positive integers, got {sizes}")
        return sorted(set(sizes))


def course_world_sizes(root) -> tuple[int, ...]:
    """c.GpuRunner.world_sizes of the course's nbgrader_config.py (default 1-4)."""
    from tpconfig import load_config
    return tuple(GpuRunner(config=load_config(str(root))).world_sizes)
