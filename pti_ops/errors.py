"""Exceptions raised for problems a user can cause and fix.

Every message names the input as the user sees it (CLI option or node widget), the value
received, what was expected and what to do. They subclass the standard types so callers
that catch ``ValueError`` / ``FileNotFoundError`` keep working.
"""

import re

# A config check's message starts with the field it is about, in backticks: "`steps` must be …".
_LEADING_FIELD = re.compile(r"^`([A-Za-z_][A-Za-z0-9_]*)`")


class PivotalError(Exception):
    """Base class of this package's errors."""


class InvalidInputError(PivotalError, ValueError):
    """An input value (setting, name, prompt, tensor shape) is not usable.

    `field` is the config field the message is about (given, or the backticked name it starts with, as
    every check in `checks.py` writes it), so that a face can say it in its user's words: the CLI's
    option (`--reg-t`), a node's widget (`` `t` ``). `rename` does that once; `field` is then None.
    """

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        match = _LEADING_FIELD.match(message) if field is None and isinstance(message, str) else None
        self.field = field or (match.group(1) if match else None)

    def rename(self, name: str) -> "InvalidInputError":
        """Say `name` where the message says the field (`` `t` `` → `--reg-t`); returns the error itself."""
        if self.field:
            self.args = (str(self.args[0]).replace(f"`{self.field}`", name),)
            self.field = None
        return self


class DatasetError(PivotalError, ValueError):
    """The training images or captions cannot be used."""


class ModelLoadError(PivotalError, ValueError):
    """A model could not be built or loaded from what was given."""


class MissingModelFileError(ModelLoadError, FileNotFoundError):
    """A model file or folder the loader needs is not on disk (nothing is ever downloaded)."""


class TokenizerError(PivotalError, ValueError):
    """A placeholder or initializer word does not tokenize as the method needs."""


class OutputExistsError(PivotalError, FileExistsError):
    """An output file already exists and overwriting was not asked for."""


class OutputWriteError(PivotalError, OSError):
    """An output cannot be written: its folder is not writable, the disk lacks the space, or a write failed.

    The message names the file, how much space it needs where known, and where to free it; any earlier
    file of that name is unchanged (outputs are written to a temporary file and renamed).
    """


class TrainingStopped(PivotalError, RuntimeError):
    """Training stopped before the end because it diverged.

    `partial` holds the result of the last good state when there was one (for example a
    `TuneResult` whose LoRA is from the last step at which the loss was finite).
    """

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial
