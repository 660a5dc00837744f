"""How error messages show the values they name: a short repr, whatever the size of the value.

A bad value can be huge (a recipe of nested YAML aliases expands to millions of items, a config
field can hold a megabyte of text); `short(value)` walks at most a few levels and items of it, so an
error message stays one readable line and costs no memory.
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxarray = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 4
_REPR.maxdict = 4
_REPR.maxstring = 60
_REPR.maxlong = 40
_REPR.maxother = 60
LIMIT = 200  # characters of a value in an error message


def short(value: Any) -> str:
    """`repr(value)`, cut to a few levels, items and characters: `[[1, 2, ...], ...]`, `'aaaa...aaaa'`."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a broken __repr__, or an int too long to print, must not hide the error
        return f"<{type(value).__name__}>"
    return text if len(text) <= LIMIT else text[: LIMIT - 3] + "..."
