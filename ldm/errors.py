"""The kinds of failure the library reports, each with the exit status a script ends with.

Every error's message is one sentence that says what is wrong and what to do; the scripts
print it as ``error: <message>`` and exit with the class's ``exit_status`` (``ldm.cli``).
Each kind also derives from the built-in exception a Python caller would expect
(``ValueError`` for a bad value, ``OSError`` for a file that cannot be written), so library
users can catch either.
"""


class LdmError(Exception):
    """Base of the failures this project reports in one line."""
    exit_status = 1


class UsageError(LdmError, ValueError):
    """A flag or argument the run cannot take (out of range, not finite, contradictory)."""
    exit_status = 2


class WrongType(LdmError, TypeError):
    """An argument of the wrong kind (a number where a list of seeds goes, None for an
    image): a library caller's mistake, reported in the library's words."""
    exit_status = 2


class InputError(LdmError, ValueError):
    """A file given as input that cannot be used: checkpoint, config, image, prompt file."""
    exit_status = 3


class ConfigError(InputError):
    """A model config that is not valid YAML, has no ``model:`` or names a missing class."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks to run code (or build a class) outside the allow-list."""


class ModelNotFound(InputError, FileNotFoundError):
    """No checkpoint or config where one was expected."""


class OutputError(LdmError, OSError):
    """An output folder or file that cannot be written."""
    exit_status = 4


class ResourceError(LdmError, RuntimeError):
    """What this machine cannot give: memory for a size, a device that is not there."""
    exit_status = 5
