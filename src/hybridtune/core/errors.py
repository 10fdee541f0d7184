"""Exceptions with messages that say which key, which module and what was expected.

Each subclasses ValueError (or RuntimeError) too, so callers that only know the builtin
hierarchy still catch them.
"""


class HybridTuneError(Exception):
    """Base of every error raised on purpose by hybridtune: the CLI prints these as one line (exit code 2)."""


class TargetError(HybridTuneError, ValueError):
    """A target pattern matched nothing, or matched modules the method cannot wrap."""


class CheckpointError(HybridTuneError, ValueError):
    """A checkpoint cannot be loaded into this model (missing file, corrupt, wrong base...)."""


class MergeError(HybridTuneError, RuntimeError):
    """A merge/unmerge was asked for that would give a wrong or lossy model."""


class HybridTuneWarning(UserWarning):
    """Something worth knowing that is not an error (the CLI prints these as one ``warning:`` line)."""


class TargetWarning(HybridTuneWarning):
    """A target pattern left out weights a user may think it covers (``all-linear`` on an MoE model)."""
