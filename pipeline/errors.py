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


class BlocksFailed(RuntimeError):
    """Some blocks of a run failed (after Dask's retries); the others are finished and in the
    ledger, so a rerun does only the failed ones. ``summary`` is the run's ``RunSummary``."""

    def __init__(self, summary):
        self.summary = summary
        shown = "; ".join(summary.failed[:5]) + ("; ..." if len(summary.failed) > 5 else "")
        super().__init__(f"{len(summary.failed)} of {summary.total} blocks failed ({shown}); "
                         f"{summary.done + summary.skipped} are finished and kept: rerun to do the rest")
