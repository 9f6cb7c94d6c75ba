"""overtile's library: overlap-tile U-Net inference, weight maps and training over huge Zarr
images, blockwise on Dask. Nothing here imports Prefect (that is ``flows/``).

Four parts, one direction of dependency (``tests/test_layering.py`` keeps it so):

- :mod:`pipeline.numerics`: arrays in, arrays out (geometry, U-Net, tiling, weight map,
  metrics, augmentation, downsampling, thresholds); no Zarr, Dask or device streams;
- :mod:`pipeline.storage`: images in and out (Zarr, OME-Zarr, slides), the ledger;
- :mod:`pipeline.jobs`: the blockwise jobs on Dask, all of one shape (predict, weights,
  ingest, the pyramid), inference on a device, training;
- on top: :mod:`pipeline.cli` (the ``overtile`` command) and :mod:`pipeline.preview`
  (pictures); :mod:`pipeline.errors` is the one exception type users see, importable by all.
"""

__version__ = "0.1.0"
