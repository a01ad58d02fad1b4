"""Exceptions raised on bad input. The CLI maps them to exit status 2."""


class InputError(ValueError):
    """Bad input: wrong rank, layout, shape, dtype, value, parameter or file.

    The message names the argument, what was expected and what was given.
    """


class MemoryLimitError(InputError, MemoryError):
    """The reference would need more memory than the configured limit allows."""
