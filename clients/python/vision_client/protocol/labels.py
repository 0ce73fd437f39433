"""The one rule for class names (a fine-tuned model's labels); torch-free.

A label is shown wherever an answer is shown: in the classification extension's
``"score:index:label"`` strings, in the web console, in logs and in other programs' tables. So a
label is one line of visible text:

- not empty, and at most ``max_bytes`` bytes of UTF-8 (the server's ``--max-label-length``);
- none of its characters is of the Unicode general categories in :data:`REFUSED_CATEGORIES`:
  controls (``Cc``: line breaks, tabs, escapes), format characters (``Cf``: the bidi embeddings,
  overrides and isolates U+202A-U+202E and U+2066-U+2069, the marks U+200E, U+200F and U+061C,
  zero-width spaces, the byte-order mark, soft hyphens, tag characters), surrogates, private-use
  and unassigned code points, line and paragraph separators, and spaces other than U+0020
  (no-break, ideographic and other spaces, which look like a space and are not one);
- except :data:`ALLOWED_CHARACTERS`: the plain space, and the zero-width non-joiner and joiner
  (U+200C, U+200D), which Persian, the Indic scripts and emoji sequences need to be written
  correctly and which change no direction.

This is what Python's ``str.isprintable()`` accepts, plus those two joiners. Letters of every
script are allowed, right-to-left ones included: the console shows every string that comes from
the server isolated from the text around it. The rule's parameters (:func:`label_rule`) are what
the console checks class names with before it uploads them, so it refuses what the server would.

The server applies it to the examples of a job (``service/finetune/examples.py``) and to every
label of a manifest it reads from its model store (``service/finetune/store.py``).
"""

from __future__ import annotations

import unicodedata
from typing import Any

REFUSED_CATEGORIES: tuple[str, ...] = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
"""Unicode general categories a label may not hold (but see :data:`ALLOWED_CHARACTERS`)."""

ALLOWED_CHARACTERS: frozenset[str] = frozenset(" \u200c\u200d")
"""Characters of a refused category that a label may hold."""

_WHAT = {
    "Cc": "a control character",
    "Cf": "an invisible format character (it can reverse or hide the text around it)",
    "Cs": "a lone surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Zs": "a space other than the plain space",
}


def label_problem(label: str, max_bytes: int | None = None) -> str | None:
    """What is wrong with ``label`` as a class name, as the end of a sentence that starts with the
    label (``"... is 130 bytes of UTF-8, ..."``), with how to fix it; None if it is a valid one.

    ``max_bytes``: the server's limit on a label's UTF-8 length; None checks the characters only.
    Costs one pass over at most ``max_bytes`` bytes: the length is checked first.
    """
    if not label:
        return "is empty; give every class a name"
    if max_bytes is not None:
        size = len(label.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            return f"is {size} bytes of UTF-8, over the limit of {max_bytes}; use a shorter class name"
    if label.isprintable():  # the common case, in C: printable characters are all allowed
        return None
    for position, char in enumerate(label):
        category = unicodedata.category(char)
        if category in REFUSED_CATEGORIES and char not in ALLOWED_CHARACTERS:
            return (
                f"has {describe(char)} at position {position}, {_WHAT[category]}; class names are one line "
                "of visible text (letters of any script, digits, punctuation, symbols, spaces): remove it"
            )
    return None


def is_label(label: str, max_bytes: int | None = None) -> bool:
    return label_problem(label, max_bytes) is None


def describe(char: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character named so that the name cannot be misread."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


def label_rule(max_bytes: int) -> dict[str, Any]:
    """The rule's parameters as JSON, for a program that checks labels before sending them (the
    web console builds its check from these: ``[\\p{Cc}\\p{Cf}...]`` without the allowed ones)."""
    return {
        "maxBytes": max_bytes,
        "refusedCategories": list(REFUSED_CATEGORIES),
        "allowedCharacters": sorted(ALLOWED_CHARACTERS),
        "categoryNames": dict(_WHAT),
    }
