"""nbgrader's Execute preprocessor, with the kernel in the sandbox, its cells' time limits
counted in CPU time, and a student's kernel death or output flood confined to that student's
notebook.

Stock nbgrader aborts a notebook whose kernel dies (`os._exit`, a killed process, an exceeded
limit): the student gets no grade and the grader exits with an error. Here the cell that was
running gets an error output that says what happened, the cells after it are marked as not run
(so their tests score 0 with that reason in the feedback), and grading goes on.

c.Execute.timeout is each cell's CPU time (tpsim.cputime: the kernel's whole process tree,
measured while the cell runs), so a busy grading machine makes a cell take longer, not time
out. A cell that computes nothing for c.TimeLimits.stall_seconds (waiting forever) is stopped
too, and nbclient's own wall-clock timeout becomes the backstop, c.TimeLimits.wall_factor times
longer. The notebook's grading budget (c.TimeLimits.notebook_cpu_seconds, shared with the
judge) ends the kernel when it is used up.
"""
from __future__ import annotations

import asyncio
import contextlib

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute

from tpjudge.cells import grade_id
from tpsim import cputime
from tpsandbox.kernel import SandboxKernelManager
from tpsandbox.settings import Sandbox, TimeLimits


def _error(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                        traceback=[f"{ename}: {evalue}"])


class SandboxedExecute(Execute):

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("kernel_manager_class", SandboxKernelManager)
        super().__init__(*args, **kwargs)
        self.sandbox = Sandbox(parent=self)
        self.limits = TimeLimits(parent=self)
        if self.sandbox.enabled:
            from tpsandbox.check import require
            require(self.sandbox)  # refuse before any notebook runs, with the fix in the message
        else:
            self.log.warning("Sandbox disabled (c.Sandbox.enabled = False): student code runs "
                             "with the grader's rights.")

    def preprocess(self, nb, resources=None, km=None, budget=None):
        """`budget`: the notebook's cputime.Budget when the judge shares it (JudgedExecute)."""
        self.budget = budget or self.new_budget()
        self._meter = None
        self._dead_in = None
        self._dead_why = ""
        self._timeouts = 0
        self._output_bytes = 0
        self._output_capped = False
        return super().preprocess(nb, resources, km)

    def new_budget(self) -> cputime.Budget:
        return cputime.Budget(self.limits.notebook_cpu_seconds, self.limits.wall_factor)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, self.resources
        if self._dead_in is None and self.budget.spent is not None:
            self._dead_in, self._dead_why = grade_id(cell) or index, self._budget_why()
        if self._dead_in is not None:
            cell.outputs = [_error("KernelDied", f"not run: the kernel died in cell "
                                   f"{self._dead_in} ({self._dead_why})")]
            return cell, self.resources
        self._expired = self._killed_why = None
        try:
            super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._dead_in = grade_id(cell) or index
            self._dead_why = self._killed_why or self._why_dead()
            cell.outputs.append(_error("KernelDied", f"the kernel died while running this cell "
                                       f"({self._dead_why})"))
            return cell, self.resources
        except CellTimeoutError:  # the kernel went silent even after the interrupt
            self._kill(cell, index)
            return cell, self.resources
        self._name_the_timeout(cell)
        self._after_timeout(cell, index)
        return cell, self.resources

    # -- the cell's limits, in CPU time ----------------------------------------------------
    def _get_timeout(self, cell):
        """nbclient's own (wall-clock) timeout: the backstop, after the watch's own (_watch)."""
        timeout = super()._get_timeout(cell)
        if timeout is None:
            return None
        return int(timeout * self.limits.wall_factor + 2 * cputime.INTERRUPT_GRACE + 5)

    async def _async_poll_for_reply(self, msg_id, cell, timeout, task_poll_output_msg,
                                    task_poll_kernel_alive):
        watch = asyncio.ensure_future(self._watch(super()._get_timeout(cell)))
        try:
            return await super()._async_poll_for_reply(msg_id, cell, timeout,
                                                       task_poll_output_msg,
                                                       task_poll_kernel_alive)
        finally:
            watch.cancel()

    async def _watch(self, cpu_seconds) -> None:
        """While a cell runs: interrupt it when it has used `cpu_seconds` of CPU time,
        computed nothing for the stall time, or run wall_factor times as long on the clock;
        kill the kernel when it does not stop within the grace, or when the notebook's budget
        is used up."""
        meter = self._kernel_meter()
        if meter is None or not cpu_seconds:
            return
        limit = cputime.Limit(meter, cpu_seconds, wall_factor=self.limits.wall_factor,
                              stall=self.limits.stall_seconds, budget=self.budget)
        limit.waiting()
        while (why := limit.check()) is None:
            await asyncio.sleep(limit.interval())
        if why.kind == "budget":
            self._kill_now(self._budget_why())
            return
        self._expired = why
        await self.km.interrupt_kernel()
        grace = cputime.Limit(meter, cputime.INTERRUPT_GRACE, wall_factor=self.limits.wall_factor,
                              stall=cputime.INTERRUPT_GRACE, budget=self.budget)
        grace.waiting()
        while (late := grace.check()) is None:
            await asyncio.sleep(grace.interval())
        self._kill_now(self._budget_why() if late.kind == "budget" else (
            f"the cell's code {why.text} and did not stop within "
            f"{cputime.INTERRUPT_GRACE:g} s of an interrupt; the kernel was killed"))

    def _kernel_meter(self) -> cputime.Meter | None:
        if self._meter is None:
            proc = getattr(getattr(self.km, "provisioner", None), "process", None)
            if proc is None:
                return None
            self._meter = cputime.Meter(proc.pid)
            self.budget.add(self._meter)
        return self._meter

    def _kill_now(self, why: str) -> None:
        """End the kernel's sandbox at once (nbclient then finds the kernel dead)."""
        self._killed_why = why
        proc = getattr(getattr(self.km, "provisioner", None), "process", None)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()

    def _budget_why(self) -> str:
        return f"the student's code {self.budget.spent.text}: nothing more of it is run"

    def _name_the_timeout(self, cell) -> None:
        """The interrupt a limit caused shows as the cell's CellTimeoutError, saying which (a
        cell that finished as its limit ran out, before the interrupt, keeps its outputs)."""
        if self._expired is None:
            for out in cell.get("outputs", []):      # nbclient's own: the wall-clock backstop
                if out.get("ename") == "CellTimeoutError" and not out.get("evalue"):
                    out.evalue = (f"the cell ran for over {self._get_timeout(cell)} s on the "
                                  "clock and was interrupted")
            return
        text = (f"the cell's code {self._expired.text} and was interrupted (each cell may use "
                f"{self.timeout} s of CPU time)")
        for i, out in enumerate(cell.get("outputs", [])):
            if out.get("output_type") == "error" and out.get("ename") == "KeyboardInterrupt":
                frames = list(out.get("traceback") or [])[:-1]
                cell.outputs[i] = NotebookNode(output_type="error", ename="CellTimeoutError",
                                               evalue=text,
                                               traceback=[*frames, f"CellTimeoutError: {text}"])
                return

    def _after_timeout(self, cell, index):
        """A second timeout in a row means the interrupt did not work (SIGINT ignored, stuck in
        C code): kill the kernel rather than spend a timeout on every remaining cell."""
        timed_out = any(o.get("ename") == "CellTimeoutError" for o in cell.get("outputs", []))
        self._timeouts = self._timeouts + 1 if timed_out else 0
        if self._timeouts >= 2:
            self._kill(cell, index)

    def _kill(self, cell, index):
        from jupyter_core.utils import run_sync
        try:
            run_sync(self.km.shutdown_kernel)(now=True)
        except Exception as err:  # the kernel is being discarded either way
            self.log.warning("killing an unresponsive kernel: %s", err)
        self._dead_in = grade_id(cell) or index
        self._dead_why = ("the kernel stopped responding after a timeout and was killed; "
                          f"each cell may use {self.timeout} s of CPU time")
        cell.outputs.append(_error("KernelDied", self._dead_why))

    def _why_dead(self) -> str:
        code = None
        prov = getattr(self.km, "provisioner", None) if self.km is not None else None
        proc = getattr(prov, "process", None)
        if proc is not None:
            code = proc.poll()
        limits = (f"exit status {code}; " if code is not None else "") + (
            f"limits: {self.sandbox.memory_mb} MiB memory, {self.sandbox.cpu_seconds} s CPU, "
            f"{self.sandbox.max_processes} processes")
        return f"the code exited, was killed, or hit a sandbox limit; {limits}"

    def output(self, outs, msg, display_id, cell_index):
        """Keep at most `Sandbox.max_output_bytes` of output per notebook."""
        if self._output_capped and msg["msg_type"] in ("stream", "display_data",
                                                        "execute_result", "update_display_data"):
            return None
        size = len(str(msg.get("content", "")))
        self._output_bytes += size
        if self._output_bytes > self.sandbox.max_output_bytes and msg["msg_type"] != "error":
            self._output_capped = True
            note = NotebookNode(output_type="stream", name="stdout",
                                text=f"\n[output truncated: over {self.sandbox.max_output_bytes} "
                                     "bytes; the rest was dropped by the grader]\n")
            outs.append(note)
            return note
        return super().output(outs, msg, display_id, cell_index)
