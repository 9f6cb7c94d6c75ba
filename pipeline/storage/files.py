"""Small files beside a run's arrays: per-block results a later pass reads (arrays as
``.npz``, never pickled), and Parquet parts of an object table. Local paths or any fsspec
URL; each file is written whole by one task, so concurrent tasks never share one.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def make_parents(fs: Any, url: str, path: str) -> None:
    """Create the folders above ``path``, on a file system that has folders. An object store
    has none (a key's prefix needs nothing made), and s3fs's makedirs would create a bucket a
    typo named."""
    from pipeline.storage.images import is_object_store

    if not is_object_store(str(url)):
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)


def _fresh(url: str) -> tuple[Any, str]:
    """The filesystem and path of ``url`` with its cached listings of ``url`` dropped: s3fs
    answers ``exists`` and ``ls`` from listings this process made earlier, which do not see
    what worker processes have written since."""
    fs, path = _fs(url)
    fs.invalidate_cache(path)
    return fs, path


def put_arrays(url: str, **arrays: np.ndarray) -> None:
    """Write named arrays to ``url`` as ``.npz`` (parents created)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fs, path = _fs(url)
    make_parents(fs, url, path)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())


def get_arrays(url: str) -> dict[str, np.ndarray]:
    """The arrays :func:`put_arrays` wrote (no pickles are loaded)."""
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        data = f.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def exists(url: str) -> bool:
    fs, path = _fresh(url)
    return bool(fs.exists(path))


def listdir(url: str) -> list[str] | None:
    """The names in a folder, or None when ``url`` is a file."""
    fs, path = _fresh(url)
    if not fs.isdir(path):
        return None
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]


def remove(url: str) -> None:
    """Remove a file or folder (tree) if it exists."""
    fs, path = _fresh(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_parquet(url: str, columns: dict[str, np.ndarray]) -> None:
    """One Parquet file from equal-length columns (parents created)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = _fs(url)
    make_parents(fs, url, path)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), f)


def read_parquet(url: str) -> dict[str, np.ndarray]:
    """A Parquet file or dataset folder as columns of numpy arrays."""
    import pyarrow.parquet as pq

    fs, path = _fs(url)
    table = pq.read_table(path, filesystem=fs)
    return {name: table.column(name).to_numpy() for name in table.column_names}


TEXT_PIECE = 1 << 20  # characters read at once by iter_lines


def iter_lines(url: str, chunk: int | None = None) -> Iterator[str]:
    """The text of a file in pieces of whole lines, each about ``chunk`` characters (default
    :data:`TEXT_PIECE`): one line-oriented file copied into another without holding it."""
    fs, path = _fs(url)
    with fs.open(path, "rt", encoding="utf-8") as f:
        while piece := f.read(chunk or TEXT_PIECE):
            yield piece + ("" if piece.endswith("\n") else f.readline())  # to the end of the line it cut


def put_text(url: str, text: str) -> None:
    fs, path = _fs(url)
    make_parents(fs, url, path)
    with fs.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
