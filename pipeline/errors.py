"""The one exception type a user sees for bad input."""


class InputError(ValueError):
    """A bad input, described in one line that names the input and what is wrong.

    The CLI prints the message and exits with status 2; nothing is written.

    Examples
    --------
    >>> raise InputError("labels.zarr: float32 labels; expected integers")
    Traceback (most recent call last):
    ...
    pipeline.errors.InputError: labels.zarr: float32 labels; expected integers
    """
