"""The errors advguard raises for bad input: each message names the problem in one line."""


class AdvguardError(ValueError):
    """Base class of every user-facing advguard error (the CLI prints it as one line)."""


class InputError(AdvguardError):
    """Images or labels of the wrong shape, dtype, range, or containing NaN/inf."""


class DataError(AdvguardError):
    """A dataset that is unknown, missing, or does not match its checksum/format."""


class CheckpointError(AdvguardError):
    """A checkpoint or run directory that is missing, truncated or of another model."""
