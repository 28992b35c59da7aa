"""The grader side: every verdict, from what the ranks reported.

Runs in `python -m gpu_runner.grade`, a process where no student code runs: each unit's judge
(its assignment's gpu/judge.py: JUDGES) recomputes the unit's data from its seed (the
assignment's gpu/data.py) and the dense reference from it in float64, and compares what every
rank reported (gpu_runner.records) through tpgrade.verdict, the verdict core the notebook's
own checks use (same tolerance, shape rule, messages and diagnoses). This module holds what
every judge works with: a unit's reports (View) and the verdicts several assignments share. A
sub-check passes when it passes on every rank of the group; its detail names the first rank
that failed, "rank r of p: ...". A report that is missing, malformed or cut short fails the
sub-checks that needed it, with the reason; it never stops the grader. numpy only.
"""
from __future__ import annotations

import re

import assignments
from tpgrade import tensors
from tpgrade.verdict import mismatch, where

from . import data, records
from .plan import Unit

NOT_CONNECTED = "the output is not connected to it in autograd"


class Absent(Exception):
    """An observation a rank did not report (its unit stopped before it, or it never ran)."""


class View:
    """One unit's reports (group rank -> its "end" record) and the verdicts made on them."""

    def __init__(self, unit: Unit, ends: dict):
        self.unit, self.size, self.ends = unit, unit.size, ends
        self.seed = data.seed_of(unit)
        self.failures: dict[str, str] = {}
        self.judged: set[str] = set()

    def obs(self, rank, key):
        end = self.ends.get(rank)
        found = end.get("obs") if isinstance(end, dict) else None
        if not isinstance(found, dict) or key not in found:
            error = end.get("error") if isinstance(end, dict) else ""
            raise Absent(error if isinstance(error, str) and error else "not reported")
        return found[key]

    def tensor(self, rank, key, field=None):
        value = self.obs(rank, key)
        if field is not None:
            if not isinstance(value, dict):
                raise records.Malformed(f"{key} is not a record")
            value = value.get(field)
        return records.tensor(value)

    def check(self, name, rank, verdict):
        """verdict() -> "" (passed on this rank) or what is wrong; a missing or malformed
        report is a failure too."""
        try:
            text = verdict()
        except Absent as exc:
            text = str(exc)
        except (records.Malformed, AttributeError, KeyError, TypeError, ValueError) as exc:
            text = f"malformed report ({exc})"
        self.judged.add(name)
        if text and name not in self.failures:
            self.failures[name] = text if text.startswith("rank ") else \
                f"{where(rank, self.size)}: {text}"

    def each(self, name, verdict):
        """verdict(rank) on every rank of the group."""
        for rank in range(self.size):
            self.check(name, rank, lambda: verdict(rank))

    def result(self, name) -> tuple[bool, str]:
        if name in self.failures:
            return False, self.failures[name]
        if name not in self.judged:
            return False, "not judged"
        return True, ""


def judge(unit: Unit, ends: dict) -> dict[str, tuple[bool, str]]:
    """{sub-check: (ok, detail)} for the unit's planned sub-checks."""
    view = View(unit, ends)
    assignments.get(unit.assignment).load("gpu.judge").JUDGES[(unit.kind, unit.step)](view)
    return {name: view.result(name) for name in unit.checks()}


def first(*texts):
    return next((t for t in texts if t), "")


def counts(view, name, key, expected):
    """Collective counts, at world size >= 2 only (a layer may skip collectives at size 1)."""
    if view.size < 2:
        return

    def verdict(rank):
        got = records.counts(view.obs(rank, key))
        if got == expected:
            return ""
        ran = ", ".join(f"{n} {k}" for k, n in sorted(got.items())) or "no collectives"
        want = ", ".join(f"{n} {k}" for k, n in expected.items()) or "no collectives"
        return f"ran {ran}, expected {want}"
    view.each(name, verdict)


# -- errors -------------------------------------------------------------------------------------
def raised(rec, types, mentions=()):
    """"" when the reported exception is one of `types` and its message matches every
    (label, regex) of `mentions`."""
    got = records.outcome(rec)
    if got is None:
        return "no error raised"
    names, message = got
    first = f"{names[0] if names else '?'}: {message.splitlines()[0] if message else ''}"
    if not set(types) & set(names):
        return f"raised {first}, expected {' or '.join(types)}"
    missing = [label for label, rx in mentions if not re.search(rx, message, re.I)]
    if missing:
        return f"{first} -- the message does not name {' / '.join(missing)}"
    return ""


def shape_pattern(*shapes):
    """Regexes matching each shape however it is written: (7, 5), torch.Size([7, 5]), 7x5."""
    return [(f"{a}, {b}", rf"\b{a}\D{{1,4}}{b}\b") for a, b in shapes]


# -- the device and dtype rules -----------------------------------------------------------------
def float64_verdict(view, rank, key, want, what):
    """Right values in float64, on the input's device, and no state left behind by .to()."""
    rec = view.obs(rank, key)
    got = records.tensor(rec)
    if got is not None:
        dtype, device = records.meta(rec)
        if device != view.obs(rank, "input_device"):
            return tensors.wrong_device(device, view.obs(rank, "input_device"), what)
        if dtype != "float64":
            return tensors.wrong_dtype(dtype, what)
    return mismatch(got, want, what, dtype="float64", missing=NOT_CONNECTED,
                    suspects=[tensors.float32_on_the_way(got, want)])


def float64_output_verdict(view, rank, want, what):
    """The float64 run's output: no tensor attribute left behind by .to(), then right in
    float64 on the input's device."""
    plain = view.obs(rank, "plain")
    if not (isinstance(plain, list) and all(isinstance(n, str) for n in plain)):
        raise records.Malformed("the list of tensor attributes")
    if plain:
        return tensors.not_moved(plain[:5])
    return float64_verdict(view, rank, "y", want, what)


def float64_verdicts(view, kind, y, dx):
    """The float64 run's output and input gradient (observe.float64_run) against y and dx."""
    view.each(f"{kind}.forward_float64",
              lambda r: float64_output_verdict(view, r, y, "the float64 output"))
    view.each(f"{kind}.grad_float64", lambda r: float64_verdict(
        view, r, "gx", dx, "dL/dx for a float64 input"))
