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


class InputFailure(str):
    """One failed block's line (``"key: error"``) whose cause is the input, e.g. a tile that
    does not decode: running the block again cannot help."""


class BlocksFailed(RuntimeError):
    """Some blocks of a run failed (after Dask's retries); the others are finished and in the
    ledger, so a rerun does only the failed ones. ``summary`` is the run's ``RunSummary``."""

    def __init__(self, summary):
        self.summary = summary
        shown = "; ".join(summary.failed[:5]) + ("; ..." if len(summary.failed) > 5 else "")
        super().__init__(f"{len(summary.failed)} of {summary.total} blocks failed ({shown}); "
                         f"{summary.done + summary.skipped} are finished and kept: rerun to do the rest")

    @property
    def input_only(self) -> bool:
        """Every failure is the input's (:class:`InputFailure`): a retry would fail again."""
        return bool(self.summary.failed) and all(isinstance(f, InputFailure) for f in self.summary.failed)
