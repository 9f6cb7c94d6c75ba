"""overtile's library: overlap-tile U-Net inference over Zarr images, blockwise on Dask.

Pure numerics in the middle (:mod:`pipeline.geometry`, :mod:`pipeline.tiling`,
:mod:`pipeline.unet`), I/O at the edges (:mod:`pipeline.storage`) and execution around them
(:mod:`pipeline.predict`, :mod:`pipeline.execute`). Nothing here imports Prefect.
"""

__version__ = "0.1.0"
