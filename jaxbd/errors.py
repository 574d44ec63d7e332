"""User-facing errors.

Everything a user can get wrong (a config value, a dataset file, a checkpoint, a learning rate that
makes training diverge) raises a subclass of `JaxbdError` with a message that names the problem in
one line; the CLI prints that line and exits with status 2, without a traceback. Bugs raise
ordinary exceptions and keep their traceback.
"""


def first_line(error: BaseException) -> str:
  """The first non-empty line of an exception's message, or its type's name when it has none
  (libraries' messages run over several lines; a jaxbd error is one)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


class JaxbdError(Exception):
  """An error caused by the user's input; its message is shown as one line."""


class ConfigError(JaxbdError):
  """A config key is unknown or a value is out of range."""


class DataError(JaxbdError):
  """A dataset is missing, unreadable or malformed."""


class CheckpointError(JaxbdError):
  """A checkpoint or workdir is unreadable or belongs to a different run."""


class DivergedError(JaxbdError):
  """Training diverged: its loss is no longer finite (a learning rate too high for the run)."""
