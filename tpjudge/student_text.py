"""A student's text as the grader shows it, in a page or a terminal: what it says, without what
could change how the text around it looks.

Exception names and messages, what a student's code printed, the ranks' reports: a student
controls all of them. Terminal escape sequences (colours, cursor moves, a title, a screen
clear), other control characters and Unicode's bidirectional controls (which reverse or reorder
the text after them on the same line, "Score: 0 / 3" shown as "3 / 0 :erocS") are removed; the
words stay. HTML escaping is the page's job (its template escapes every value), not this one's.
"""
from __future__ import annotations

import re

# ECMA-48: CSI (ESC [ ... final byte, or its 8-bit form), OSC/DCS/SOS/PM/APC strings up to
# their terminator (or the line's end), and the two-character escapes.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?")
# What is left of the C0 and C1 controls (tab and newline stay), DEL, and the bidirectional
# marks, embeddings, overrides and isolates.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(text) -> str:
    """`text` without escape sequences, control characters (but tab and newline) or bidi
    controls; a carriage return becomes a newline (a terminal would write over the line)."""
    text = "" if text is None else str(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def one_line(text, limit: int = 300) -> str:
    """plain(text) on one line, at most `limit` characters (an ellipsis says it was cut)."""
    line = " ".join(plain(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"
