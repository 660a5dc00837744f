"""Progress bars that suit where they run: a terminal, a Jupyter notebook with or without ipywidgets.

`tqdm.auto` picks a widget in a Jupyter kernel and, when ipywidgets is missing, warns "IProgress not
found" and falls back to a text bar that redraws ten times a second: in a notebook's saved output
each redraw is a separate stderr record (47 for 40 training steps). Here a kernel with ipywidgets
gets tqdm's widget (one output, updated in place); a kernel without it gets a text bar that redraws
at most every `NOTEBOOK_INTERVAL` seconds and every tenth of the run, and not for a new loss alone,
so a run leaves about a dozen records at most, however long it is (`TQDM_MININTERVAL` and
`TQDM_MINITERS` override); a terminal or a log file gets tqdm's usual text bar.

Importing this module imports `tqdm.auto` once with that warning silenced: transformers imports
`tqdm.auto` too, and `import reft` then warns about nothing.
"""

from __future__ import annotations

import os
import sys
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401  (imported quietly before transformers imports it)
import tqdm.std

NOTEBOOK_INTERVAL = 5.0  # seconds between redraws of a text bar in a notebook, at least
NOTEBOOK_REDRAWS = 10  # redraws of a text bar in a notebook over the whole run, at most (and the first and last)


def progress_bar(total: int | None = None, *, initial: int = 0, disable: bool | None = False, desc: str | None = None,
                 iterable=None):
    """A tqdm bar over `total` steps (or `iterable`) for this environment; `disable=None`: off without a terminal."""
    kwargs = dict(total=total, initial=initial, disable=disable, desc=desc)
    if in_notebook():
        if disable is None:
            kwargs["disable"] = False  # a kernel's stderr is no terminal, but it is shown
        if _widgets():
            from tqdm.notebook import tqdm as widget_bar

            return widget_bar(iterable, **kwargs)
        if "TQDM_MININTERVAL" not in os.environ:
            kwargs["mininterval"] = NOTEBOOK_INTERVAL
        steps = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        if "TQDM_MINITERS" not in os.environ and steps:
            kwargs["miniters"] = -(-steps // NOTEBOOK_REDRAWS)  # ceil: at most NOTEBOOK_REDRAWS redraws
            kwargs["maxinterval"] = float("inf")  # else tqdm's monitor thread resets miniters to 1 after 10 s
        return _NotebookTextBar(iterable, **kwargs)
    return tqdm.std.tqdm(iterable, dynamic_ncols=True, **kwargs)


class _NotebookTextBar(tqdm.std.tqdm):
    """tqdm's text bar that shows a new postfix (the loss) at its next redraw instead of redrawing for it."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's kernel app), as tqdm.autonotebook tells."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an IPython too old or too new to tell: a terminal bar is always safe
        return False


def _widgets() -> bool:
    try:
        from tqdm.notebook import IProgress
    except ImportError:
        return False
    return IProgress is not None
