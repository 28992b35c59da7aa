"""What a check expects back from code it does not control, declared, and checked whole before
any comparison reads it.

The torch notebooks' checks run their rank functions in the student's process (under the judge)
and get back whatever that process sends: a solution cell can change it (return fewer ranks'
results, an empty list, a dict with keys missing, None where a zip or an all() over nothing would
pass). So each declares the reply it expects, and the reply is validated whole first (the
gpu_runner's judges read what torchrun ranks wrote through gpu_runner.records, whose readers
fail the sub-check of a record that is missing or malformed):

    REPLY = replies.ranks(2, replies.tensors("x.grad", "the output", "the input's .grad"))
    per_rank = run_on_ranks(_f_and_g, 2, copy_to_tp_region, ..., reply=REPLY)

`run_on_ranks` (tpgrade._torch_trusted) takes the reply as a required argument and returns it
checked and converted: exactly 2 ranks' results, each exactly 3 values, each a float64 array or
None. A reply of another shape fails the check with what is wrong ("rank 1 of 2 returned
nothing", "rank 0 of 2 returned 2 values, expected 3: x.grad, the output, the input's .grad",
"rank 0 of 2: x.grad is a list, expected a torch.Tensor"): never a pass. The exact shape of an
array is the comparison's first test (verdict.mismatch: any other shape fails, with the mistake
that produces it), so the schema asks only that an array be one.

Why validation is enough (no direct path from the ranks to the grader): the ranks are forked from
the student's process and run its code, so a rank that reported to the grader directly could
report any numbers that process can compute, as the relaying process can. What relaying added is
dropping or reshaping results, which the schema refuses; what remains is computing the right
numbers another way, which no channel prevents (README, "What the judge cannot know").
"""
from __future__ import annotations

from . import _trusted as trusted
from .verdict import CheckFailed, fail, says

_NUMERIC = "fiub"     # numpy dtype kinds an array of values may have


class Reply:
    """A part of a reply: `check(value, where)` returns it converted, or fails the check."""

    def check(self, value, where):
        raise NotImplementedError

    def describe(self) -> str:
        return "a value"


class Tensor(Reply):
    """A tensor a rank sent back (tpgrade._torch_trusted.as_numpy: its values as an array; None;
    or a description of what else it was): a float64 array, or None where None may be judged
    (a gradient that never came: verdict.mismatch says so)."""

    def __init__(self, what, optional=True):
        self.what, self.optional = what, optional

    def describe(self):
        return self.what

    def check(self, value, where):
        if value is None and self.optional:
            return None
        if isinstance(value, str):
            fail(says(f"{where}: {self.what}", f"is {value[:100]}, expected a torch.Tensor"))
        if type(value) is not trusted.ndarray or value.dtype.kind not in _NUMERIC:
            fail(says(f"{where}: {self.what}", f"came back as a {type(value).__name__}, not a "
                                               f"tensor's values"))
        return value.astype(trusted.float64)


class Number(Reply):
    """An int or a float (not a bool)."""

    def __init__(self, what, integer=False):
        self.what, self.integer = what, integer

    def describe(self):
        return self.what

    def check(self, value, where):
        kinds, expected = ((int,), "an int") if self.integer else ((int, float), "a number")
        if isinstance(value, bool) or not isinstance(value, kinds):
            fail(says(f"{where}: {self.what}", f"came back as {_kind(value)}, expected "
                                               f"{expected}"))
        return value


class Text(Reply):
    def __init__(self, what, limit=2000):
        self.what, self.limit = what, limit

    def describe(self):
        return self.what

    def check(self, value, where):
        if not isinstance(value, str):
            fail(says(f"{where}: {self.what}", f"came back as a {type(value).__name__}, "
                                               f"expected text"))
        return value[:self.limit]


class Optional(Reply):
    """None, or `item`."""

    def __init__(self, item):
        self.item = item

    def describe(self):
        return self.item.describe()

    def check(self, value, where):
        return None if value is None else self.item.check(value, where)


class Either(Reply):
    """The first of `options` the value is (each tried in turn; the last one's failure wins)."""

    def __init__(self, *options):
        self.options = options

    def describe(self):
        return " or ".join(o.describe() for o in self.options)

    def check(self, value, where):
        for option in self.options[:-1]:
            try:
                return option.check(value, where)
            except CheckFailed:
                continue
        return self.options[-1].check(value, where)


class Tuple(Reply):
    """Exactly len(items) values, in order (a list or a tuple)."""

    def __init__(self, *items, what="values"):
        self.items, self.what = items, what

    def describe(self):
        return ", ".join(i.describe() for i in self.items)

    def check(self, value, where):
        n = len(self.items)
        if not isinstance(value, (list, tuple)):
            fail(f"{where} returned {_kind(value)}, expected {n} {self.what}: {self.describe()}")
        if len(value) != n:
            fail(f"{where} returned {len(value)} {self.what}, expected {n}: {self.describe()}")
        return tuple(item.check(v, where) for item, v in zip(self.items, value))


class Sequence(Reply):
    """A list or tuple of `item`s: exactly `length` of them when given, at most `limit`."""

    def __init__(self, item, what, length=None, limit=1000):
        self.item, self.what, self.length, self.limit = item, what, length, limit

    def describe(self):
        return self.what

    def check(self, value, where):
        if not isinstance(value, (list, tuple)):
            fail(says(f"{where}: {self.what}", f"came back as {_kind(value)}, expected a list"))
        if self.length is not None and len(value) != self.length:
            fail(says(f"{where}: {self.what}", f"holds {len(value)} entries, expected "
                                               f"{self.length}"))
        if len(value) > self.limit:
            fail(says(f"{where}: {self.what}", f"holds {len(value)} entries, at most "
                                               f"{self.limit} expected"))
        return [self.item.check(v, f"{where}, {self.what}[{i}]") for i, v in enumerate(value)]


class Mapping(Reply):
    """A dict: `keys` and `values` each validated; `required`: keys it must hold."""

    def __init__(self, what, keys, values, required=(), limit=1000):
        self.what, self.keys, self.values = what, keys, values
        self.required, self.limit = tuple(required), limit

    def describe(self):
        return self.what

    def check(self, value, where):
        if not isinstance(value, dict):
            fail(says(f"{where}: {self.what}", f"came back as {_kind(value)}, expected a dict"))
        if len(value) > self.limit:
            fail(says(f"{where}: {self.what}", f"holds {len(value)} keys"))
        missing = [k for k in self.required if k not in value]
        if missing:
            fail(says(f"{where}: {self.what}", f"has no {', '.join(map(repr, missing))}"))
        return {self.keys.check(k, where): self.values.check(v, f"{where}, {self.what}[{k!r}]")
                for k, v in value.items()}


class Ranks(Reply):
    """One result per rank of a world of `size`: exactly `size` of them, each an `item`."""

    def __init__(self, size, item):
        self.size, self.item = size, item

    def describe(self):
        return f"{self.size} ranks' results"

    def check(self, value, where=""):
        if not isinstance(value, (list, tuple)):
            fail(f"the ranks' results came back as {_kind(value)}, expected one result per rank "
                 f"of {self.size}")
        if len(value) < self.size:
            fail(f"rank {len(value)} of {self.size} returned nothing: {len(value)} result"
                 f"{'s' if len(value) != 1 else ''} came back for {self.size} ranks")
        if len(value) > self.size:
            fail(f"{len(value)} results came back for {self.size} ranks")
        return [self.item.check(v, f"rank {r} of {self.size}") for r, v in enumerate(value)]


def _kind(value):
    return "nothing" if value is None else f"a {type(value).__name__}"


def tensors(*whats, optional=True):
    """A rank's tuple of tensors, named for the messages."""
    return Tuple(*(Tensor(what, optional) for what in whats))


def ranks(size, item):
    return Ranks(size, item)


def outcomes(n):
    """A rank's outcomes of n calls that should each raise: None (the call returned) or the
    exception's (type name, message)."""
    raised = Tuple(Text("the exception's type"), Text("its message"))
    return Sequence(Optional(raised), "the outcomes", length=n)


from ._harness import make_read_only  # noqa: E402

make_read_only(__name__)
