"""Scoring a prediction against labels as the ISBI 2012 challenge did, honestly: every
choice is made on some slices (``choose_on``), then the scored slices are scored once, at 0.5
and at the chosen threshold (Rand error with cells grown over the membrane and without, pixel
error, IoU). Beside them: the Rand error of cells agglomerated by their borders
(:func:`pipeline.numerics.metrics.agglomerated_cells`) at the merge threshold chosen there,
the rule (grown or agglomerated) that scored lower there, and the pixel error at the
threshold with the lowest pixel error there (:func:`pipeline.numerics.metrics.choose`).
The CLI's ``overtile score``; with ``overtile train --val-slices --test-slices`` and
``overtile predict --tta`` it makes the protocol reproducible from the command line alone
(bench/isbi2012.py runs it over seeds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs.blockwise import Axes
from pipeline.numerics.metrics import choose, pixel_error, scores_at


class ScoreSettings(BaseModel):
    """What ``overtile score`` compares; shared by the CLI and the Python API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probabilities: str = Field(description="Class probabilities written by 'overtile predict' (OME-Zarr, classes first)")
    labels: str = Field(description="True labels of the same spatial shape: a cell mask (nonzero = cell) or instances")
    axes: Axes = Field(None, description="Axes of the labels when they are a plain Zarr array, e.g. zyx")
    slices: tuple[int, ...] = Field(description="The slices (z) to score, e.g. 20-24")
    choose_on: tuple[int, ...] = Field((), description="Slices to choose the threshold on (never the scored ones), "
                                       "e.g. 15-19; without them only 0.5 is reported")
    object_class: int = Field(1, ge=0, description="The cell class: its channel in the probabilities")

    @field_validator("slices", "choose_on")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(v)))


def score(settings: ScoreSettings) -> dict[str, Any]:
    """Scores of ``settings.slices``, with every choice made on ``settings.choose_on``.

    Returns
    -------
    dict
        ``slices`` and ``at_0.5`` (:func:`~pipeline.numerics.metrics.scores_at` at 0.5) always;
        with ``choose_on`` also ``choose_on``, ``threshold`` (the lowest grown Rand error
        there), ``merge_threshold`` (agglomerated cells' lowest there), ``on_choice`` (both
        rules' Rand errors there and the lowest pixel error, so predictions from other
        checkpoints or with test-time augmentation can be compared on those slices alone), ``rule`` (the lower of the two), ``at_chosen`` (every score at
        ``threshold``, agglomerated cells at ``merge_threshold``), ``pixel_threshold`` (the
        lowest pixel error there) and ``pixel_error_at_pixel_threshold``.
    """
    s = settings
    if set(s.slices) & set(s.choose_on):
        raise InputError(f"--choose-on and --slices share {sorted(set(s.slices) & set(s.choose_on))}: a threshold "
                         f"chosen on the scored slices is not a score")
    probabilities = storage.open_image(storage.absolute(s.probabilities))
    labels = storage.open_image(storage.absolute(s.labels), s.axes)
    if len(probabilities.spatial_shape) != 3:
        raise InputError(f"{s.probabilities}: a {len(probabilities.spatial_shape)}-D image; score takes a z, y, x "
                         f"stack of slices (--slices picks them), as ISBI 2012's")
    if probabilities.spatial_shape != labels.spatial_shape:
        raise InputError(f"{s.probabilities}: spatial shape {probabilities.spatial_shape}; the labels "
                         f"{labels.spatial_shape} (both must be the same z, y, x stack)")
    if s.object_class >= probabilities.channels:
        raise InputError(f"{s.probabilities}: {probabilities.channels} classes; no class {s.object_class}")
    depth = labels.spatial_shape[0]
    if max(s.slices + s.choose_on) >= depth:
        raise InputError(f"slice {max(s.slices + s.choose_on)}: the stack has {depth} slices (0-{depth - 1})")

    def read(slices: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        p = np.stack([_cell_probability(probabilities, z, s.object_class) for z in slices])
        t = np.stack([_plane(labels, z)[0] for z in slices])  # the scores tell a mask from instances
        return p, t

    prob, truth = read(s.slices)
    result: dict[str, Any] = {"slices": list(s.slices), "at_0.5": scores_at(prob, truth, 0.5)}
    if s.choose_on:
        choice = read(s.choose_on)
        c = choose(*choice)
        result.update(threshold=c.threshold, merge_threshold=c.merge_threshold, choose_on=list(s.choose_on),
                      on_choice={"rand_error": c.rand_error, "rand_error_agglomerated": c.rand_error_agglomerated,
                                 "pixel_error": c.pixel_error},
                      rule=c.rule, at_chosen=scores_at(prob, truth, c.threshold, merge_threshold=c.merge_threshold),
                      pixel_threshold=c.pixel_threshold,
                      pixel_error_at_pixel_threshold=pixel_error(prob > c.pixel_threshold, truth))
    return result


def _plane(source: storage.ImageSource, z: int) -> np.ndarray:
    from pipeline.numerics.geometry import Box

    shape = source.spatial_shape
    return source.read(Box((z, 0, 0), (1, *shape[1:])))[:, 0]


def _cell_probability(source: storage.ImageSource, z: int, cls: int) -> np.ndarray:
    """One slice of the class's probability, as a float in [0, 1] (uint8 outputs store 255·p)."""
    plane = _plane(source, z)[cls]
    return plane.astype(np.float32) / 255 if plane.dtype == np.uint8 else plane.astype(np.float32)
