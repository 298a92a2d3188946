"""The ``SparseMMError`` family: user-facing problems with a message that names the fix.

The CLI prints the message on one line and exits with status 2, without a traceback; library
callers catch ``SparseMMError`` (or a subclass) and decide for themselves. A broken invariant inside
sparsemm is an ``InternalError`` instead: a bug to report, which keeps its traceback.
"""

from __future__ import annotations


class SparseMMError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class ProfileError(SparseMMError):
    """A head profile that is malformed, inconsistent, or for another model."""


class BudgetError(SparseMMError):
    """Budget knobs that cannot be satisfied (e.g. budget not above the window, ratio outside [0, 1])."""


class OutputExistsError(SparseMMError):
    """An output file exists and ``--force`` was not given."""


class ModelResolutionError(SparseMMError):
    """A model name or path that cannot be resolved locally."""


class PoolExhaustedError(SparseMMError):
    """The head-paged KV pool has no free pages left for an allocation."""


class UnsupportedGenerationError(SparseMMError):
    """A generation mode the SparseMM cache cannot serve correctly (and therefore refuses)."""


class MissingDependencyError(SparseMMError):
    """An optional engine or library is not installed."""


class LoadTestError(SparseMMError):
    """Load-test settings or inputs that cannot work (``--images`` with ``completions``, an unreadable prompt file)."""


class UnsupportedModelError(SparseMMError):
    """A model feature the ragged cache cannot reproduce exactly (refused rather than run wrong)."""


class InternalError(RuntimeError):
    """A broken invariant inside sparsemm (a double free, a table in an impossible state): a bug, not a user
    mistake. Deliberately not a ``SparseMMError``, so it is never reported as ``error: ...`` with exit 2."""
