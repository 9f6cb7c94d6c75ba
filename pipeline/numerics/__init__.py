"""Numerics: arrays in, arrays out. Geometry (boxes, blocks, mirroring), the U-Net, overlap-tile
planning and stitching, the paper's weight map, segmentation metrics, augmentation,
downsampling and tissue thresholds. No Zarr, no Dask, no device streams: the jobs feed these
from storage, and the exactness tests call them directly."""
