"""Code in a solution cell that reaches for the grader, found by reading it (never running it).

A tensor-parallel layer needs numpy, the collectives and its own arithmetic. Code that touches
the interpreter's module table, import machinery, code objects, frames, trace or profile hooks,
the garbage collector, the notebook shell, the grading packages or the profiler that counts
collectives is trying to change how it is judged. Since the judge runs apart (tpjudge), such
code cannot change a verdict; the flag tells the instructor to look, and costs no points.

Reading is not proof: code built at run time (`getattr(__import__("s" + "ys"), ...)`) is seen
only as far as its pieces (`__import__` itself is flagged).
"""
from __future__ import annotations

import ast

PREFIX = "Flagged for the instructor"

# import name (or its first dotted part) -> why it is suspicious in a solution cell
_MODULES = {
    "tpgrade": "the course's checks", "assignments": "the course's checks and example students",
    "tpjudge": "the judge", "tpgrader": "the grader", "tpconfig": "the grader's configuration",
    "tpsandbox": "the sandbox", "gpu_runner": "the GPU grader", "tpcourse": "instructor tooling",
    "nbgrader": "the grading tool", "builtins": "the built-in functions", "gc": "the garbage "
    "collector, which reaches every object", "ctypes": "raw memory access", "inspect": "frames and "
    "source of other code", "importlib": "the import machinery", "IPython": "the notebook shell",
    "ipykernel": "the notebook kernel", "socket": "the network", "signal": "signals",
    "pickle": "pickled objects", "marshal": "code objects", "dis": "bytecode",
}
_ATTRS = {
    "modules": "the interpreter's module table", "meta_path": "the import hooks",
    "path_hooks": "the import hooks", "settrace": "a trace hook", "setprofile": "a profile hook",
    "_getframe": "another function's frame", "__code__": "a function's code object",
    "__globals__": "a function's globals", "__closure__": "a function's closure",
    "__defaults__": "a function's defaults", "__kwdefaults__": "a function's defaults",
    "__subclasses__": "every subclass of a type", "__builtins__": "the built-in functions",
    "f_locals": "a frame's variables", "f_globals": "a frame's globals",
    "f_back": "the calling frame", "tb_frame": "a traceback's frame",
    "gi_frame": "a generator's frame", "get_objects": "every object in the process",
    "get_referrers": "the objects that refer to another",
    "profiler": "the profiler, which counts the collectives", "_C": "torch's internals",
    "_python_dispatch": "torch's dispatch hooks", "overrides": "torch's function hooks",
    "set_custom_exc": "the notebook's error reporting",
    "showtraceback": "the notebook's error reporting", "kill": "a signal to another process",
    "killpg": "a signal to a process group", "getppid": "the parent process",
    "_exit": "leaving the process at once", "_record": "the collectives' recorder",
    "_open_recordings": "the collectives' recorder",
}
_NAMES = {
    "__import__": "the import function", "get_ipython": "the notebook shell",
    "__builtins__": "the built-in functions", "exec": "running code built at run time",
    "eval": "running code built at run time", "compile": "compiling code at run time",
    "TorchDispatchMode": "torch's dispatch hooks", "TorchFunctionMode": "torch's function hooks",
}
# an array type with its own arithmetic or comparisons can tell a check anything
_ARRAY_BASES = {"np.ndarray", "numpy.ndarray", "ndarray", "torch.Tensor", "Tensor"}
_LYING_METHODS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__sub__",
                  "__rsub__", "__abs__", "__bool__", "__array_ufunc__", "__array_function__",
                  "__torch_function__", "__torch_dispatch__", "astype", "all", "any"}
# modules whose attributes a solution has no business replacing
_LIBRARIES = {"np", "numpy", "torch", "dist", "F", "nn", "tpsim", "math", "sys", "os"}
_PATH_WORDS = ("gradebook", "nbgrader", ".ipynb", "source/", "autograded", "submitted/")


def scan(source: str) -> list[tuple[int, str]]:
    """[(line, what)] for each place in `source` that reaches for the grader, in line order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []          # the kernel shows the syntax error; nothing ran that could reach
    found = set()
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        for what in _findings(node):
            found.add((line, what))
    return sorted(found)


def _findings(node):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top in _MODULES:
                yield f"imports {name} ({_MODULES[top]})"
            elif "profiler" in name or "_python_dispatch" in name:
                yield f"imports {name} (the profiler and dispatch hooks count the collectives)"
    elif isinstance(node, ast.Attribute) and node.attr in _ATTRS:
        yield f"{ast.unparse(node)} ({_ATTRS[node.attr]})"
    elif isinstance(node, ast.Name) and node.id in _NAMES:
        yield f"{node.id} ({_NAMES[node.id]})"
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in _flat(targets):
            if isinstance(target, ast.Attribute) and _base_name(target) in _LIBRARIES:
                yield f"replaces {ast.unparse(target)} (a library's own function)"
    elif isinstance(node, ast.Call) and _callee(node) in ("setattr", "delattr") and node.args:
        if _base_name(node.args[0]) in _LIBRARIES:
            yield f"replaces an attribute of {ast.unparse(node.args[0])} (setattr)"
    elif isinstance(node, ast.ClassDef) and any(ast.unparse(b) in _ARRAY_BASES for b in node.bases):
        own = sorted({item.name for item in node.body
                      if isinstance(item, ast.FunctionDef) and item.name in _LYING_METHODS}
                     | {t.id for item in node.body if isinstance(item, ast.Assign)
                        for t in item.targets if isinstance(t, ast.Name)
                        and t.id in _LYING_METHODS})
        if own:
            yield f"an array type with its own {', '.join(own)} (it can answer a check's " \
                  f"comparisons as it likes)"
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        word = next((w for w in _PATH_WORDS if w in node.value), None)
        if word:
            yield f"names the grader's files ({word!r})"


def _flat(targets):
    """Assignment targets, with tuple and list unpacking opened up."""
    for target in targets:
        if isinstance(target, (ast.Tuple, ast.List)):
            yield from _flat(target.elts)
        else:
            yield target


def _base_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _callee(node):
    return node.func.id if isinstance(node.func, ast.Name) else None


def comment(findings) -> str:
    """The gradebook comment for a flagged cell (shown by the formgrader and the feedback)."""
    lines = "; ".join(f"line {line}: {what}" for line, what in findings[:12])
    more = f" (and {len(findings) - 12} more)" if len(findings) > 12 else ""
    return (f"{PREFIX} (costs no points by itself): this cell reaches for the grader: "
            f"{lines}{more}. Every verdict is decided apart from the student's code, so none of "
            f"this changed a score; please review it.")
