"""Checks that a forward pass on the torch engine makes once, at its end.

On a GPU, every read of a device value by the host (a count turned into an int,
``nonzero``, ``bool(t)``) waits for all the work queued before it: the host cannot
run ahead of the GPU while it waits, and a pass that reads the device cannot be
captured as a CUDA graph. The checked path reads the device up to four times per
layer: non-finite inputs, whether any input clipped (convolutions), which outputs drew
a rejected normal, and whether every rejected normal's walk finished.

Inside :func:`deferred_checks` the torch engine reads none of them. What it would
have checked at once becomes a device flag (:meth:`DeferredChecks.flag`), and the
outputs to read again exactly go in a buffer of fixed size. The caller reads every
flag with one sync at the end of the pass (:meth:`DeferredChecks.failed`). If one is
set (a non-finite input, more rejected outputs than the buffer holds, a walk longer
than its fixed steps), the caller rewinds every grid the pass used
(:meth:`DeferredChecks.rewind`) and runs the pass again, checked. Its results and
its errors are then the checked path's, bitwise; the deferred pass's are the same
whenever no flag is set, which the tests hold it to.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_active = threading.local()


class DeferredChecks:
    """The flags of one pass and what its grids were before it."""

    def __init__(self) -> None:
        self._flags: list = []  # device conditions, 0-d: nonzero if the pass must run again
        self._before: dict = {}  # id(grid) -> (grid, its state before the pass)

    def flag(self, condition: torch.Tensor) -> None:
        """Note a device condition, a 0-d bool or count (nonzero is true), that makes
        the pass run again, checked. Nothing is read from the device here, and nothing
        is computed: the flags are combined once, at the end (on a GPU each operation
        costs host time, and a pass notes a few flags per layer)."""
        self._flags.append(condition)

    def enter(self, grid) -> None:
        """Keep a grid's state (vectors read, conversion counts) before its first read
        in the pass, so that a rerun reads the same noise and counts once."""
        if id(grid) not in self._before:
            self._before[id(grid)] = (grid, grid.read_state())

    def failed(self) -> bool:
        """Whether any flag is set: the pass's one read of the device (none if no
        flag was noted, as on the Numba engine)."""
        pending = self.pending()
        return pending is not None and bool(pending)

    def pending(self) -> Optional[torch.Tensor]:
        """Whether any flag is set, as a 0-d bool on the device, unread (None: no flag
        was noted), for a caller that reads it later: a CUDA graph's replay writes it at
        every pass."""
        if not self._flags:
            return None
        if len(self._flags) > 1 or self._flags[0].dtype != torch.bool:
            self._flags = [torch.stack(self._flags).any()]  # (bools and counts: stack promotes)
        return self._flags[0]

    def rewind(self) -> None:
        """Put every grid read in the pass back as it was before it."""
        for grid, state in self._before.values():
            grid.restore_read_state(state)
        self._before.clear()
        self._flags = []


def current() -> Optional[DeferredChecks]:
    """The checks of the pass running in this thread, or None: check at once."""
    return getattr(_active, "checks", None)


@contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Defer the torch engine's checks within the block to the caller (see the module's
    text); the caller must read ``failed()`` after it. Blocks do not nest: a pass
    inside another's defers to the outer one."""
    if current() is not None:
        raise RuntimeError("deferred_checks() is already active in this thread: the outer pass checks")
    _active.checks = DeferredChecks()
    try:
        yield _active.checks
    finally:
        _active.checks = None


def deferred_pass(run):
    """run() with the torch engine's checks deferred to its end, and run again checked
    (the grids rewound) if one failed; inside another such pass, run() alone."""
    if current() is not None:
        return run()
    return run_deferred(run)[0]


def run_deferred(run) -> tuple:
    """(run()'s result with the checks deferred, whether a check failed): if one did,
    the grids were rewound and the result is that of run() again, checked."""
    with deferred_checks() as checks:
        out = run()
    if not checks.failed():
        return out, False
    checks.rewind()
    return run(), True
