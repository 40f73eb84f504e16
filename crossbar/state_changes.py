"""Modules that count the changes to their state.

Whatever is derived from a module's state and kept needs to know when to derive it
again. The case in point is a CUDA graph of a forward pass (``mapping.graphs``): it
holds the tensors and host values of the pass it recorded. A module with
:class:`CountsChanges` counts every assignment to its attributes, except those in
``bookkeeping``: a pass itself sets those as it runs (counts, the vectors read), and
they are no change of state. Changes made in place to tensors are seen through the
tensors' own versions."""
from __future__ import annotations


class CountsChanges:
    """Mixin for torch modules (list it before ``nn.Module``): ``state_changes`` is the
    number of assignments to the module's attributes outside ``bookkeeping``."""

    bookkeeping: frozenset = frozenset()

    def __setattr__(self, name: str, value) -> None:
        if name not in self.bookkeeping:
            object.__setattr__(self, "state_changes", self.__dict__.get("state_changes", 0) + 1)
        super().__setattr__(name, value)
