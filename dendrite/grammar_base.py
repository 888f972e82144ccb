"""The constraint protocol the engine uses for per-branch grammars.

The engine knows only this: a constraint forks with its branch, says which tokens it allows
next (filled for the whole batch at once by :func:`dendrite.grammar.fill_masks`), consumes
the tokens the branch takes, and says when it is finished. :mod:`dendrite.grammar`
implements it with llguidance; anything else with these methods works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BranchConstraint(Protocol):
    def fork(self) -> BranchConstraint:
        """An independent copy (llguidance: ``deep_copy``) for a forked branch."""
        ...

    def consume(self, tokens: Sequence[int]) -> None:
        """Advance over ``tokens``; raise GrammarError (changing nothing) if any is not allowed."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` consumed (a failed step rolls its grammar states back)."""
        ...

    def is_finished(self) -> bool:
        """True when the grammar admits no further token (the branch must stop)."""
        ...

    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (the branch may stop)."""
        ...
