"""nbgrader's Execute preprocessor, with the kernel in the sandbox and a student's kernel
death or output flood confined to that student's notebook.

Stock nbgrader aborts a notebook whose kernel dies (`os._exit`, a killed process, an exceeded
limit): the student gets no grade and the grader exits with an error. Here the cell that was
running gets an error output that says what happened, the cells after it are marked as not run
(so their tests score 0 with that reason in the feedback), and grading goes on.
"""
from __future__ import annotations

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute

from tpjudge.cells import grade_id
from tpsandbox.kernel import SandboxKernelManager
from tpsandbox.settings import Sandbox


def _error(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                        traceback=[f"{ename}: {evalue}"])


class SandboxedExecute(Execute):

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("kernel_manager_class", SandboxKernelManager)
        super().__init__(*args, **kwargs)
        self.sandbox = Sandbox(parent=self)
        if self.sandbox.enabled:
            from tpsandbox.check import require
            require(self.sandbox)  # refuse before any notebook runs, with the fix in the message
        else:
            self.log.warning("Sandbox disabled (c.Sandbox.enabled = False): student code runs "
                             "with the grader's rights.")

    def preprocess(self, nb, resources=None, km=None):
        self._dead_in = None
        self._dead_why = ""
        self._timeouts = 0
        self._output_bytes = 0
        self._output_capped = False
        return super().preprocess(nb, resources, km)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, self.resources
        if self._dead_in is not None:
            cell.outputs = [_error("KernelDied", f"not run: the kernel died in cell "
                                   f"{self._dead_in} ({self._dead_why})")]
            return cell, self.resources
        try:
            super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._dead_in = grade_id(cell) or index
            self._dead_why = self._why_dead()
            cell.outputs.append(_error("KernelDied", f"the kernel died while running this cell "
                                       f"({self._dead_why})"))
            return cell, self.resources
        except CellTimeoutError:  # the kernel went silent even after the interrupt
            self._kill(cell, index)
            return cell, self.resources
        self._after_timeout(cell, index)
        return cell, self.resources

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
                          f"each cell may run {self.timeout} s")
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
