"""Storage: images in and out (Zarr, OME-Zarr, slides read in place) and the ledger of a run.

The names most callers need are here; each lives in the module that owns it:
:mod:`~pipeline.storage.images` (Zarr and OME-Zarr images, outputs and label images),
:mod:`~pipeline.storage.slides` (TIFF-based slides and pictures),
:mod:`~pipeline.storage.sources` (the one door for inputs, and their stamps),
:mod:`~pipeline.storage.ledger` (finished blocks).
"""

from pipeline.storage.images import (
    AXES_CHOICES,
    OME_VERSION,
    OUTPUT_CODEC,
    SHARD_CHUNK,
    ImageSource,
    absolute,
    check_output,
    checked_source,
    create_image,
    is_object_store,
    is_url,
    label_parent,
    level_translation,
    multiscales,
    ome_metadata,
    open_output,
    output_layout,
    register_label,
    scale_from_ome,
    translation_from_ome,
    unlist_label,
    write_unit,
)
from pipeline.storage.ledger import Ledger, open_array, stored_chunks
from pipeline.storage.sources import cached_image, open_image, stamp

__all__ = [
    "AXES_CHOICES", "OME_VERSION", "OUTPUT_CODEC", "SHARD_CHUNK", "ImageSource", "Ledger", "absolute", "cached_image",
    "check_output", "checked_source", "create_image", "is_object_store", "is_url", "label_parent", "level_translation",
    "multiscales", "ome_metadata", "open_array", "open_image", "open_output", "output_layout", "register_label",
    "scale_from_ome", "stamp", "stored_chunks", "translation_from_ome", "unlist_label", "write_unit",
]
