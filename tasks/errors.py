"""One exception type per kind of user mistake; messages name the file, row, column or field."""


class LlmpipeError(Exception):
    """Base class for errors a user can fix; never retried."""


class ConfigError(LlmpipeError, ValueError):
    """The configuration is invalid."""


class DataError(LlmpipeError, ValueError):
    """Input data is missing, malformed or unusable."""


class PolicyError(ConfigError):
    """A run's parameters, or what they lead the worker to read, reach beyond what the worker's operator allows
    (``tasks.policy``, ``tasks.confine``)."""


class TrainingDiverged(LlmpipeError):
    """Training produced a non-finite loss or gradient norm more often than ``max_skipped_steps`` allows; the
    same run would diverge again, so it is never retried, and no model is saved."""
