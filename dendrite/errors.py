"""The package's exception types.

Every error Dendrite raises on bad input is a :class:`DendriteError`, and every call that
raises one leaves the pool, the KV tree and the model exactly as they were before the call
(validation happens before any state changes; allocation is all-or-nothing).
"""

from __future__ import annotations


class DendriteError(Exception):
    """Base class of every error Dendrite raises on purpose."""


class CheckpointError(DendriteError):
    """A checkpoint path is missing, or a tensor in it is missing, unexpected or mis-shaped."""


class UnsupportedModelError(DendriteError):
    """The checkpoint's architecture or a config feature is not supported."""


class ConfigError(DendriteError):
    """An engine, pool or sampling setting is invalid (page size 0, top_p above 1, ...)."""


class InvalidTokenError(DendriteError):
    """A token id is outside the model's vocabulary."""


class ContextLengthError(DendriteError):
    """A branch would grow past the model's maximum context."""


class PoolExhaustedError(DendriteError):
    """The page pool has too few free pages for the requested operation."""


class BranchError(DendriteError):
    """A branch handle is unknown, already freed, or used where it cannot be."""


class GrammarError(DendriteError):
    """A grammar does not compile, or a constrained branch cannot continue."""


class SearchError(DendriteError):
    """A search algorithm or its settings are invalid."""


__all__ = [
    "BranchError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "DendriteError",
    "GrammarError",
    "InvalidTokenError",
    "PoolExhaustedError",
    "SearchError",
    "UnsupportedModelError",
]
