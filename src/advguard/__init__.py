"""advguard: multi-strength adversarial training and adversarial-input detection.

The package is laid out as its pipeline; imports only run down it::

    data -> models -> attacks -> training / ensemble -> evaluation -> reports -> reproduce -> cli
"""

from advguard.errors import AdvguardError, CheckpointError, DataError, InputError

__all__ = ["AdvguardError", "CheckpointError", "DataError", "InputError", "__version__"]
__version__ = "0.1.0"
