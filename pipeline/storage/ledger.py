"""The ledger: which blocks of a run are finished, kept beside the run's output.

A rerun reads it and does only the rest; ``fingerprint`` names everything that determines the
output's values, so a rerun with other settings (or against a rewritten input) is refused
instead of mixing its blocks with the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zarr

from pipeline.errors import InputError
from pipeline.numerics.geometry import Block
from pipeline.storage.images import write_unit

LEDGER = "ledger"


@dataclass(frozen=True)
class Ledger:
    """Which blocks of a run are finished: a ``uint8`` Zarr array beside the output, one
    chunk per block, so concurrent tasks never write the same object.

    ``fingerprint`` names the settings that determine the output's values; a rerun with a
    different fingerprint must not mix its blocks with the old ones.
    """

    url: str
    grid: tuple[int, ...]

    @classmethod
    def prepare(cls, group_url: str, grid: Sequence[int], fingerprint: str, overwrite: bool) -> "Ledger":
        """Open the ledger of the output group at ``group_url``, creating or resetting it."""
        url = f"{str(group_url).rstrip('/')}/{LEDGER}"
        group = zarr.open_group(store=str(group_url), mode="r+")
        if LEDGER in group and not overwrite:
            array = group[LEDGER]
            if array.attrs.get("fingerprint") != fingerprint or tuple(array.shape) != tuple(grid):
                raise InputError(
                    f"{group_url}: holds the output of a run with other settings (input, model, "
                    f"blocks or output type differ); pass --overwrite to start over"
                )
            return cls(url, tuple(grid))
        array = group.create_array(
            LEDGER, shape=tuple(grid), chunks=(1,) * len(grid), dtype="uint8", fill_value=0, overwrite=True
        )
        array.attrs["fingerprint"] = fingerprint
        return cls(url, tuple(grid))

    def done(self) -> np.ndarray:
        """Boolean array over the block grid: True where the block is finished (a block's
        chunk is written only when the block is finished)."""
        stored = stored_chunks(self.url)
        return zarr.open_array(store=self.url, mode="r")[...] > 0 if stored is None else stored

    def mark(self, block: Block) -> None:
        open_array(self.url)[block.index] = 1


def open_array(url: str) -> zarr.Array:
    """Open a Zarr array that overtile wrote (Zarr v3: outputs, ledgers, work arrays) for
    writing, fresh for every task.

    Not cached: a long-lived worker may see the same URL recreated with another shape or
    chunking (``--overwrite`` with another block size), and a stale handle would write the
    old chunk grid. Reading ``zarr.json`` costs far less than any block; naming the format
    spares the probes for Zarr v2 metadata (on S3, two requests where there were six).
    """
    return zarr.open_array(store=url, mode="r+", zarr_format=3)


def stored_chunks(url: "str | zarr.Array") -> np.ndarray | None:
    """Boolean array over the grid of the Zarr array's write units (:func:`write_unit`: its
    shards when it is sharded, else its chunks): True where one is stored (elsewhere the
    array holds its fill value); None for a store that cannot list.

    Listing the objects that exist answers without touching the (possibly hundreds of
    thousands of) others: planning over a mostly empty slide costs what its written blocks
    cost. A sharded array's keys name its shards, one object each.
    """
    array = zarr.open_array(store=url, mode="r") if isinstance(url, str) else url
    grid = tuple(-(-n // c) for n, c in zip(array.shape, write_unit(array)))
    stored = np.zeros(grid, dtype=bool)
    try:
        from zarr.core.sync import sync

        separator = array.metadata.chunk_key_encoding.separator
        start = (f"{array.store_path.path}/" if array.store_path.path else "") + "c" + separator

        async def listed() -> list[str]:
            return [k async for k in array.store_path.store.list_prefix(start)]

        for key in sync(listed()):  # "c/i/j": the default chunk key encoding of Zarr 3
            stored[tuple(int(i) for i in key[len(start):].split(separator))] = True
    except (AttributeError, NotImplementedError, TypeError, ValueError, IndexError):  # a store that cannot list
        return None
    return stored
