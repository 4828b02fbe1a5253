"""The errors a user can cause. Each carries one line that says what was expected.

Scripts catch `MinidiffError`, print its message and exit with status 2 (`cli.exit_code`), so a user never sees a
traceback from deep inside torch for a missing file, an empty folder or a wrong key layout. Exception classes only.
"""


class MinidiffError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class DataError(MinidiffError, ValueError):
    """An image folder, image file or caption that cannot be used."""


class CheckpointError(MinidiffError, ValueError):
    """A weights file or folder that is missing, unreadable or of another layout or architecture."""


class LoRAError(MinidiffError, ValueError):
    """A LoRA file whose keys or shapes do not fit the model, or bad LoRA settings."""


class TrainingError(MinidiffError, RuntimeError):
    """Training cannot go on: NaN loss, unsupported GPU, nothing to resume from."""


class OutputError(MinidiffError, OSError):
    """An output location that is a file, read-only, full, or in use by another run."""
