"""Cells as objects: instance labels, an object table and QuPath outlines, blockwise and
exact (the whole-image rule of :mod:`pipeline.numerics.instances`, up to renumbering).

The shape of :mod:`pipeline.jobs.blockwise`, with the global part in ``prepare``:

- **seeds** (a pass over the blocks that hold probabilities): each block's seed components,
  numbered 1..n inside the block, into ``OUTPUT/work/seeds``; n per block in a small array.
- **faces** (a pass): the pairs of local ids that touch across each block's far faces.
- **merge** (once, in this process): provisional ids number the blocks' components in block
  order; the face pairs merge components (connected components of the pair graph), objects
  under ``min_size`` are dropped and the rest numbered 1..N. Each block's part of the table
  (its local id -> global id) is written beside it: no worker ever holds the whole table.
- **blocks** (the job's own tasks): each block reads its seed ids with a halo of
  ``grow_distance``, maps them with its own and its neighbours' parts, grows them, writes the
  label block, and measures its objects. Objects inside the block go straight into a Parquet
  part of the table (and their outlines into a GeoJSON fragment); objects on a face shared
  with another block leave partial sums and outline pieces.
- **finish**: the partial sums added up (each spanning object measured once), their pieces
  merged into one outline, the GeoJSON streamed together, the label pyramid, the work removed.

Ids are deterministic: they depend on the image and the settings only, not on the worker
count, block order or retries. Every pass keeps a ledger, so a rerun resumes, and a killed
run plus a rerun is bit-identical to a clean run.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.jobs.pyramid import build_pyramid, unlist_levels
from pipeline.jobs.weights import far_face_pairs
from pipeline.numerics import instances
from pipeline.numerics.downsample import level_shapes
from pipeline.numerics.geometry import Block, Box, block_at, block_grid
from pipeline.storage import files

log = logging.getLogger("overtile")

WORK = "work"
MICRONS = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6}


class ObjectOptions(BaseModel):
    """The rule and the outputs of an object run: what the segment flow asks for after
    prediction (the probabilities, image and cluster are the prediction's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(description="Output label image of object ids (0 = background); IMAGE/labels/NAME makes it an "
                        "NGFF label image of IMAGE")
    object_class: int = Field(1, ge=0, description="The objects' class: its channel in the probabilities")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Seeds: pixels whose probability of the class is above this")
    grow_threshold: float | None = Field(None, ge=0.0, lt=1.0, description="Objects grow over pixels above this "
                                         "probability of their class (default: over any pixel)")
    grow_distance: int = Field(0, ge=0, description="Pixel steps each object grows by (0: the seeds are the objects)")
    min_size: int = Field(0, ge=0, description="Drop objects whose seeds hold fewer pixels")
    dtype: Literal["uint16", "uint32", "uint64"] = Field("uint32", description="Label dtype (uint64 for more than 4 "
                                                         "billion objects)")
    table: str | None = Field(None, description="Object table, a Parquet dataset folder (default: beside the output, "
                              "NAME.parquet)")
    geojson: str | None = Field(None, description="Also write the outlines for QuPath as a GeoJSON FeatureCollection "
                                "(.geojson or .geojson.gz; 2-D)")
    class_name: str = Field("Cell", description="The objects' classification name in QuPath")
    pyramid: bool = Field(True, description="Also write downsampled levels of the labels (nearest)")


class ObjectSettings(blockwise.BlockwiseSettings, ObjectOptions):
    """An object run; shared by the CLI, the Python API and the segment flow."""

    probabilities: str = Field(description="Class probabilities written by 'overtile predict' (OME-Zarr, classes first)")
    image: str | None = Field(None, description="Image measured for mean intensities per channel (default: the "
                              "probabilities' input)")
    axes: blockwise.Axes = Field(None, description="Axes of --image when it is a plain Zarr array")
    block_size: blockwise.BlockSize = None
    shards: blockwise.Shards = None
    chunk_size: blockwise.ChunkSize = None
    workers: blockwise.Workers = None
    scheduler: blockwise.Scheduler = None
    overwrite: blockwise.Overwrite = False

    @classmethod
    def after_prediction(cls, options: ObjectOptions, predict: Any) -> "ObjectSettings":
        """The object run that follows a prediction (its output, input, layout and cluster)."""
        return cls(probabilities=predict.output, image=predict.input, axes=predict.axes,
                   block_size=predict.block_size, shards=predict.shards, chunk_size=predict.chunk_size,
                   workers=predict.workers, scheduler=predict.scheduler, overwrite=predict.overwrite,
                   **options.model_dump())


def default_table(output: str) -> str:
    """``a/slide.zarr/labels/cells`` -> ``a/slide.cells.parquet``; ``a/cells.zarr`` ->
    ``a/cells.parquet`` (outside the Zarr hierarchy, which holds only Zarr nodes)."""
    output = output.rstrip("/")
    head, sep, rest = output.partition(".zarr")
    if not sep:
        return output + ".parquet"
    name = rest.strip("/").rsplit("/", 1)[-1]
    return f"{head}.{name}.parquet" if name else f"{head}.parquet"


@dataclass(frozen=True)
class ObjectJob(blockwise.BlockwiseJob):
    """A planned object run: what every block task needs."""

    kind: ClassVar[str] = "objects"

    settings: ObjectSettings
    spatial_axes: str
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    channel_axis: bool  # the label image has a leading channel axis of 1 (its image has one)
    present: tuple[tuple[int, ...], ...]  # grid indices of blocks that hold probabilities
    spacing: tuple[float, ...]
    unit: str | None  # the spatial unit, when the probabilities have one
    image: str | None  # measured for intensities
    image_axes: str | None
    channels: int
    table: str
    label_of: str | None = None  # the OME-Zarr image this is a label image of, listed there when finished
    fresh: bool = False  # this run created the output (an error in a global pass removes it again)
    objects: int | None = None  # N, once the merge has run
    passes: tuple[tuple[str, float], ...] = ()  # seconds of the global passes this run made: seeds, faces, merge

    @property
    def work(self) -> str:
        return f"{self.output.rstrip('/')}/{WORK}"

    @property
    def output_array(self) -> str:
        return f"{self.output.rstrip('/')}/0"

    def blocks(self) -> list[Block]:
        """The blocks with probabilities and those within the growth's reach of them."""
        grid = block_grid(self.spatial_shape, self.block_shape)
        wanted = np.zeros(grid, bool)
        if self.present:
            wanted[tuple(np.array(self.present).T)] = True
        reach = [-(-self.settings.grow_distance // b) for b in self.block_shape]
        if any(reach):
            from scipy import ndimage

            wanted = ndimage.maximum_filter(wanted, size=[2 * r + 1 for r in reach], mode="constant")
        return [block_at(i, self.spatial_shape, self.block_shape) for i in np.argwhere(wanted)]

    # --- prepare: seeds, faces, merge -------------------------------------------------------

    def wants_prepare(self) -> bool:
        return self.objects is None

    def prepare(self, client: Any) -> "ObjectJob":
        """Seed components per block, the pairs across faces, the merge; each pass resumes
        from its own ledger, and the merge's result is kept in the work group's attributes."""
        if self.objects is not None:
            return self
        grid = block_grid(self.spatial_shape, self.block_shape)
        group = zarr.open_group(store=self.work, mode="a")
        if group.attrs.get("fingerprint") != self.fingerprint:  # a fresh run, or one of other settings
            group = zarr.open_group(store=self.work, mode="w")
            group.attrs["fingerprint"] = self.fingerprint
            group.create_array("seeds", shape=self.spatial_shape, chunks=self.block_shape, dtype="uint32",
                               fill_value=0, compressors=[storage.OUTPUT_CODEC])
            for name in ("counts", "big"):  # seed components per block, and those of at least min_size pixels
                group.create_array(name, shape=grid, chunks=(1,) * len(grid), dtype="int64", fill_value=0)
            for name in ("seeds_pass", "faces_pass"):
                zarr.open_group(store=f"{self.work}/{name}", mode="w")
        present = [block_at(i, self.spatial_shape, self.block_shape) for i in self.present]
        watch = blockwise.Stopwatch()
        for name, job_type in (("seeds", SeedPass), ("faces", FacePass)):
            with watch(name):
                ledger = storage.Ledger.prepare(f"{self.work}/{name}_pass", grid, self.fingerprint, overwrite=False)
                part = job_type(output=self.output, ledger=ledger, fingerprint=self.fingerprint, parent=self)
                done = ledger.done()
                blockwise.run_blocks(client, part, [b for b in present if not done[b.index]])
        with watch("merge"):
            objects = self.merge(present)
        log.info("objects: %d objects; seeds %.1f s, faces %.1f s, merge %.2f s", objects, *watch.seconds.values())
        return replace(self, objects=objects, passes=tuple(watch.seconds.items()))

    def merge(self, present: list[Block]) -> int:
        """Resolve the faces once, here, and write each block's part of the id table beside
        it. Memory follows the objects on block faces and the block count, not the objects:
        provisional ids number the blocks' components in block order (``offset[b] + k``),
        only those that touch across a face are merged, and each block's final ids follow
        from its part (:func:`~pipeline.numerics.instances.block_ids`)."""
        group = zarr.open_group(store=self.work, mode="r+")
        if "objects" in group.attrs:
            return int(group.attrs["objects"])
        min_size = self.settings.min_size
        counts = np.asarray(group["counts"][...]).ravel().astype(np.uint64)
        big = np.asarray(group["big"][...]).ravel().astype(np.uint64) if min_size > 1 else counts
        ends = np.cumsum(counts)
        offsets = ends - counts
        pairs = []
        for block in present:
            if not counts[block.number]:
                continue
            faces = files.get_arrays(f"{self.work}/faces/{block.key}.npz")
            for axis in range(block.write.ndim):
                local = faces[f"axis{axis}"]
                if len(local):
                    neighbour = block_at(tuple(i + (a == axis) for a, i in enumerate(block.index)),
                                         self.spatial_shape, self.block_shape)
                    pairs.append(np.stack([local[:, 0] + offsets[block.number],
                                           local[:, 1] + offsets[neighbour.number]], axis=1))
        members, rep = instances.representatives(np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64))
        home = np.searchsorted(ends, members)  # the block of each member
        local = members - offsets[home]
        by_block = np.split(np.arange(len(members)), np.flatnonzero(np.diff(home)) + 1) if len(members) else []
        is_rep = rep == members
        big_member = np.ones(len(members), bool)
        if min_size > 1:  # objects are kept by their whole size: the sum of their members' sizes
            size = np.zeros(len(members), np.int64)
            for rows in by_block:
                sizes = self.sizes(int(home[rows[0]]))
                size[rows] = sizes[local[rows].astype(np.int64) - 1]
            big_member = size >= min_size
            total = np.zeros(len(members), np.int64)
            np.add.at(total, np.searchsorted(members, rep), size)
            kept_rep = is_rep & (total >= min_size)
        else:
            kept_rep = is_rep
        kept = big - np.bincount(home[big_member], minlength=len(counts)).astype(np.uint64) \
            + np.bincount(home[kept_rep], minlength=len(counts)).astype(np.uint64)
        base = np.cumsum(kept) - kept
        objects = int(kept.sum())
        if objects > np.iinfo(self.settings.dtype).max:
            if self.fresh:  # leave nothing behind
                files.remove(self.output)
                files.remove(self.table)
                if self.label_of:
                    storage.unlist_label(self.label_of, self.output)
            raise InputError(f"{self.output}: {objects} objects do not fit {self.settings.dtype} labels; use --dtype "
                             f"{'uint32' if objects <= np.iinfo(np.uint32).max else 'uint64'}")
        final = np.zeros(len(members), np.uint64)  # of the kept representatives, then of every member
        for rows in by_block:
            b = int(home[rows[0]])
            if kept_rep[rows].any():
                flags = instances.kept_ids(int(counts[b]), self.sizes(b) if min_size > 1 else None, min_size,
                                           local[rows], kept_rep[rows])
                ids = instances.block_ids(int(base[b]), flags, np.zeros(0, np.int64), np.zeros(0, np.uint64))
                final[rows] = np.where(kept_rep[rows], ids[local[rows].astype(np.int64)], 0)
        where_rep = np.searchsorted(members, rep)
        final = np.where(kept_rep[where_rep], final[where_rep], 0).astype(np.uint64)
        starts = {int(home[rows[0]]): rows for rows in by_block}
        for block in present:
            n = int(counts[block.number])
            if n:
                rows = starts.get(block.number, np.zeros(0, np.int64))
                files.put_arrays(f"{self.work}/parts/{block.key}.npz", count=np.array(n), base=np.array(base[block.number]),
                                 local=local[rows], final=final[rows], kept=kept_rep[rows])
        group.attrs["objects"] = objects
        return objects

    def sizes(self, number: int) -> np.ndarray:
        """Pixel counts of one block's seed components (local ids 1..n)."""
        index = np.unravel_index(number, block_grid(self.spatial_shape, self.block_shape))
        return files.get_arrays(f"{self.work}/sizes/{'.'.join(map(str, index))}.npz")["sizes"]

    def block_table(self, key: str) -> np.ndarray:
        """This block's local id -> global id table, from its part (cached per worker)."""
        return _block_table(self, key)

    # --- the blocks -------------------------------------------------------------------------

    def probability(self, box: Box) -> np.ndarray:
        """The class's probability over ``box``, float32 in [0, 1] (uint8 outputs store 255·p)."""
        source = storage.cached_image(self.settings.probabilities, None, self.fingerprint)
        p = source.read(box)[self.settings.object_class]
        if p.dtype == np.uint8:
            return p.astype(np.float32) / 255
        # blocks a tissue-masked prediction never computed hold NaN: no tissue, probability 0
        return np.nan_to_num(p.astype(np.float32, copy=False), nan=0.0)

    def global_seeds(self, box: Box) -> np.ndarray:
        """The seed components over ``box`` with their global ids, each block's part of the
        id table read for the blocks ``box`` touches (never the whole table)."""
        local = storage.open_array(f"{self.work}/seeds")[box.slices()]
        out = np.zeros(local.shape, np.uint64)
        first = [o // b for o, b in zip(box.offset, self.block_shape)]
        last = [(s - 1) // b for s, b in zip(box.stop, self.block_shape)]
        for index in itertools.product(*(range(f, la + 1) for f, la in zip(first, last))):
            part = block_at(index, self.spatial_shape, self.block_shape).write.intersect(box)
            where = part.relative_to(box)
            ids = local[where]
            if ids.any():
                out[where] = self.block_table(".".join(map(str, index)))[ids]
        return out

    def run_block(self, block: Block) -> dict[str, Any]:
        """Map, grow and write the block's labels; measure its objects; mark it."""
        s = self.settings
        watch = blockwise.Stopwatch()
        with watch("read"):
            read = block.write.grow(s.grow_distance).clip(self.spatial_shape)
            seeds = self.global_seeds(read)
            p = self.probability(read)
        with watch("compute"):
            labels = instances.grow(seeds, instances.foreground(p, s.grow_threshold), s.grow_distance)
            core = labels[block.write.relative_to(read)].astype(s.dtype)
        with watch("write"):
            storage.open_array(self.output_array)[(Ellipsis, *block.write.slices())] = core[None] if self.channel_axis else core
        with watch("measure"):
            intensity = None
            if self.image is not None:
                intensity = storage.cached_image(self.image, self.image_axes, self.fingerprint).read(block.write)
            m = instances.measure(core, block.write.offset, p[block.write.relative_to(read)], intensity)
            faces = [(axis, side) for axis in range(core.ndim)
                     for side, shared in ((0, block.write.offset[axis] > 0),
                                          (-1, block.write.stop[axis] < self.spatial_shape[axis])) if shared]
            spanning = np.isin(m["id"], instances.boundary_ids(core, faces))
            inside = {k: v[~spanning] for k, v in m.items()}
            if len(inside["id"]):
                files.write_parquet(f"{self.table}/part-{block.number:09d}.parquet", self.rows(inside))
            pieces: dict[int, list[Any]] = {}
            if s.geojson:
                from pipeline.numerics.outlines import outline_parts

                # an object cut by the block's edge may fall apart here: every part is kept
                parts = outline_parts(core, block.write.offset, m["id"])
                files.put_text(f"{self.work}/features/{block.key}.json",
                               self.features(inside, {i: parts[i][0] for i in inside["id"].tolist()}))
                pieces = {i: parts[i] for i in m["id"][spanning].tolist()}
            if spanning.any():
                files.put_arrays(f"{self.work}/partials/{block.key}.npz", **{k: v[spanning] for k, v in m.items()},
                                 **_pack(pieces))
        self.ledger.mark(block)
        return {"block": block.key, "pixels": block.write.size, "objects": int((~spanning).sum()),
                "spanning": int(spanning.sum()), **{f"{k}_s": v for k, v in watch.seconds.items()}}

    def rows(self, m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Table columns from summed measurements (pixels -> means, centroids, physical area)."""
        area = m["area"].astype(np.float64)
        cols: dict[str, np.ndarray] = {"id": m["id"].astype(np.uint64), "area_px": m["area"].astype(np.int64)}
        if self.unit in MICRONS:
            physical = area * float(np.prod(self.spacing)) * MICRONS[self.unit] ** len(self.spacing)
            cols["volume_um3" if len(self.spacing) == 3 else "area_um2"] = physical
        for k, axis in enumerate(self.spatial_axes):
            cols[f"centroid_{axis}"] = m["sum"][:, k] / area
        for k, axis in enumerate(self.spatial_axes):
            cols[f"bbox_{axis}0"] = m["low"][:, k]
            cols[f"bbox_{axis}1"] = m["high"][:, k]
        cols["mean_probability"] = m["probability"] / area
        for c in range(m["intensity"].shape[1]):
            cols[f"mean_intensity_{c}"] = m["intensity"][:, c] / area
        return cols

    def features(self, m: dict[str, np.ndarray], outlines: dict[int, Any]) -> str:
        """GeoJSON features of the measured objects (QuPath detections), one per line."""
        from pipeline.storage.geojson import features_text

        rows = self.rows(m)
        ids = rows.pop("id")
        return features_text(ids, [outlines[i] for i in ids.tolist()],
                             (self.settings.class_name, _colour(self.settings.class_name)), rows)

    # --- finish -----------------------------------------------------------------------------

    def before_blocks(self) -> None:
        unlist_levels(self.output)  # derived from level 0, which changes now

    def wants_finish(self, computing: int) -> bool:
        meta = dict(zarr.open_group(store=self.output, mode="r").attrs.get("overtile", {}))
        return meta.get("finished") != self.fingerprint

    def finish(self, client: Any) -> int:
        """Spanning objects measured once (and outlined once), the GeoJSON, the pyramid; then
        the work group goes. Returns the pyramid levels written."""
        import contextlib

        from pipeline.storage.geojson import FeatureWriter

        done = self.ledger.done()
        computed = [b for b in self.blocks() if done[b.index]]
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(FeatureWriter(self.settings.geojson)) if self.settings.geojson else None
            if writer is not None:
                for block in computed:
                    url = f"{self.work}/features/{block.key}.json"
                    if files.exists(url):
                        for text in files.iter_lines(url):  # whole features: a cut one is no JSON
                            writer.write_text(text)
            self.close_spanning(computed, writer)
        if not files.exists(self.table):  # no objects: an empty table, not a missing one
            one = (1,) * len(self.spatial_shape)  # the measurements of a pixel of background: none, every column
            none = instances.measure(np.zeros(one, np.uint8), (0,) * len(one), np.zeros(one, np.float32),
                                     np.zeros((self.channels, *one)) if self.channels else None)
            files.write_parquet(f"{self.table}/part-empty.parquet", self.rows(none))
        if self.label_of:  # listed in its image once complete, so viewers never find it half made
            storage.register_label(self.label_of, self.output, 1)
        levels = 0
        if self.settings.pyramid and level_shapes(tuple(self.spatial_shape), len(self.spatial_shape)):
            levels = build_pyramid(client, self.output, "nearest", present=done, present_block=self.block_shape)
        group = zarr.open_group(store=self.output, mode="r+")
        group.attrs["overtile"] = {**dict(group.attrs.get("overtile", {})), "finished": self.fingerprint,
                                   "objects": self.objects, "table": self.table, "geojson": self.settings.geojson}
        files.remove(self.work)  # after "finished": a run killed in between leaves it for the next plan to remove
        return levels

    def close_spanning(self, computed: list[Block], writer: Any) -> None:
        """Add up the partial sums of the objects on shared faces and merge their outline
        pieces, one row of blocks at a time: an object is connected, so one that has no piece
        in a row is complete, and only the objects open across two rows are held."""
        import shapely

        from pipeline.numerics.outlines import merge_pieces

        keys = ("id", *instances.MEASURES)
        held: list[dict[str, np.ndarray]] = []
        held_ids, held_wkb = np.zeros(0, np.uint64), []
        rows = itertools.groupby(computed, key=lambda b: b.index[0])
        for row, blocks in itertools.chain(rows, [(None, [])]):
            found = []
            for block in blocks:
                url = f"{self.work}/partials/{block.key}.npz"
                if files.exists(url):
                    arrays = files.get_arrays(url)
                    found.append({k: arrays[k] for k in keys})
                    ids, wkb = _unpack(arrays)
                    held_ids, held_wkb = np.concatenate([held_ids, ids]), held_wkb + wkb
            if not held and not found:
                continue
            parts = instances.combine(held + found)
            here = np.unique(np.concatenate([f["id"] for f in found])) if found else np.zeros(0, np.uint64)
            complete = ~np.isin(parts["id"], here)
            held = [{k: v[~complete] for k, v in parts.items()}]
            closed = {k: v[complete] for k, v in parts.items()}
            if not len(closed["id"]):
                continue
            files.write_parquet(f"{self.table}/part-spanning-{row if row is not None else 'end'}.parquet",
                                self.rows(closed))
            if writer is not None:
                order = np.argsort(held_ids, kind="stable")
                sorted_ids = held_ids[order]
                lo = np.searchsorted(sorted_ids, closed["id"], side="left")
                hi = np.searchsorted(sorted_ids, closed["id"], side="right")
                outlines = {int(i): merge_pieces([shapely.from_wkb(held_wkb[k]) for k in order[a:b]])
                            for i, a, b in zip(closed["id"], lo, hi)}
                writer.write_text(self.features(closed, outlines))
                keep = ~np.isin(held_ids, closed["id"])
                held_wkb = [w for w, k in zip(held_wkb, keep) if k]
                held_ids = held_ids[keep]


@dataclass(frozen=True)
class SeedPass(blockwise.BlockwiseJob):
    """Seed components of one block, numbered inside it."""

    kind: ClassVar[str] = "seeds"
    parent: ObjectJob = None  # type: ignore[assignment]

    def run_block(self, block: Block) -> dict[str, Any]:
        job = self.parent
        labels, count = instances.seed_components(job.probability(block.write) > job.settings.threshold)
        storage.open_array(f"{job.work}/seeds")[block.write.slices()] = labels
        if job.settings.min_size > 1 and count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.int64)
            files.put_arrays(f"{job.work}/sizes/{block.key}.npz", sizes=sizes)
            storage.open_array(f"{job.work}/big")[block.index] = int((sizes >= job.settings.min_size).sum())
        storage.open_array(f"{job.work}/counts")[block.index] = count
        self.ledger.mark(block)
        return {"block": block.key, "seeds": count}


@dataclass(frozen=True)
class FacePass(blockwise.BlockwiseJob):
    """The local id pairs that touch across a block's far faces, one array per axis."""

    kind: ClassVar[str] = "faces"
    parent: ObjectJob = None  # type: ignore[assignment]

    def run_block(self, block: Block) -> dict[str, Any]:
        job = self.parent
        pairs = far_face_pairs(storage.open_array(f"{job.work}/seeds"), block, job.spatial_shape)
        files.put_arrays(f"{job.work}/faces/{block.key}.npz", **{f"axis{axis}": p for axis, p in enumerate(pairs)})
        self.ledger.mark(block)
        return {"block": block.key, "pairs": sum(len(p) for p in pairs)}


@functools.lru_cache(maxsize=64)
def _block_table(job: ObjectJob, key: str) -> np.ndarray:
    """A block's local -> global id table (cached per worker: neighbouring blocks share them)."""
    part = files.get_arrays(f"{job.work}/parts/{key}.npz")
    count = int(part["count"])
    sizes = None
    if job.settings.min_size > 1:
        sizes = files.get_arrays(f"{job.work}/sizes/{key}.npz")["sizes"]
    kept = instances.kept_ids(count, sizes, job.settings.min_size, part["local"], part["kept"])
    return instances.block_ids(int(part["base"]), kept, part["local"], part["final"])


def _pack(pieces: dict[int, list[Any]]) -> dict[str, np.ndarray]:
    """Outline pieces per object id as flat arrays (WKB bytes, their lengths, their ids)."""
    ids = [i for i, parts in pieces.items() for _ in parts]
    wkb = [p.wkb for parts in pieces.values() for p in parts]
    return {"wkb": np.frombuffer(b"".join(wkb), np.uint8), "wkb_lengths": np.array([len(w) for w in wkb], np.int64),
            "wkb_ids": np.array(ids, np.uint64)}


def _unpack(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, list[bytes]]:
    data = arrays["wkb"].tobytes()
    ends = np.cumsum(arrays["wkb_lengths"])
    return arrays["wkb_ids"], [data[e - n:e] for e, n in zip(ends, arrays["wkb_lengths"])]


def _colour(name: str) -> tuple[int, int, int]:
    """A stable colour per class name (QuPath shows detections in their class's colour)."""
    import colorsys
    import hashlib

    hue = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def plan_objects(settings: ObjectSettings) -> tuple[ObjectJob, blockwise.Pending]:
    """Check the probabilities, the image and the output; create or reopen the output and its
    ledger; find the blocks that hold probabilities. No cluster."""
    settings = blockwise.absolute_paths(settings, "probabilities", "output", "image", "table", "geojson")
    source = storage.open_image(settings.probabilities)
    meta = dict(zarr.open_group(store=settings.probabilities, mode="r").attrs.get("overtile", {})) \
        if _is_group(settings.probabilities) else {}
    if meta.get("output_kind") == "labels":
        raise InputError(f"{settings.probabilities}: holds argmax labels, not probabilities; predict with --output probabilities")
    if settings.object_class >= source.channels:
        raise InputError(f"{settings.probabilities}: {source.channels} classes (0..{source.channels - 1}); "
                         f"there is no class {settings.object_class}")
    if source.dtype.kind not in "fu" or (source.dtype.kind == "u" and source.dtype != np.uint8):
        raise InputError(f"{settings.probabilities}: {source.dtype} values; probabilities are float or uint8 (255·p)")
    nd = len(source.spatial_shape)
    if settings.geojson and nd != 2:
        raise InputError(f"{settings.geojson}: GeoJSON outlines are 2-D; {settings.probabilities} is {nd}-D")
    image = settings.image or meta.get("input")
    image_axes = settings.axes if settings.image else None
    channels, measured = 0, None
    if image is not None:
        try:
            measured = storage.open_image(image, image_axes)
        except InputError:
            if settings.image:
                raise
            image = None  # the recorded input has moved: no intensities, said in the log
            log.warning("%s: the probabilities' input is not readable; no mean intensities", meta.get("input"))
        else:
            if measured.spatial_shape != source.spatial_shape:
                raise InputError(f"{image}: shape {measured.spatial_shape}; the probabilities have {source.spatial_shape}")
            channels = measured.channels
    block_shape = settings.block_shape(source.spatial_shape) if settings.block_size else \
        storage.write_unit(source.array)[-nd:]
    into_image = storage.label_parent(image, settings.output) if image else None
    channel_axis = bool(into_image) and "c" in storage.open_image(into_image).axes
    out_shape = ((1,) if channel_axis else ()) + tuple(source.spatial_shape)
    existed = storage.check_output(settings.output, out_shape, settings.dtype, settings.overwrite,
                                   reads=(settings.probabilities, image))
    if existed and not settings.overwrite:
        kind = dict(zarr.open_group(store=settings.output, mode="r").attrs.get("overtile", {})).get("output_kind")
        if kind != "objects":
            raise InputError(f"{settings.output}: holds another image ({kind or 'not an object label image'}); "
                             f"pass --overwrite to replace it")
    table = settings.table or default_table(settings.output)
    run = blockwise.fingerprint(
        probabilities=settings.probabilities, stamp=storage.stamp(source), image=image,
        image_stamp=storage.stamp(measured) if measured is not None else None,
        object_class=settings.object_class, threshold=settings.threshold, grow_threshold=settings.grow_threshold,
        grow_distance=settings.grow_distance, min_size=settings.min_size, dtype=settings.dtype, block=block_shape,
        table=table, geojson=settings.geojson, class_name=settings.class_name,
    )
    spacing = tuple(source.scale.get(a, 1.0) for a in source.spatial_axes)
    units = {source.units.get(a) for a in source.spatial_axes}
    unit = units.pop() if len(units) == 1 else None
    chunks, shards = settings.output_layout(out_shape, ((1,) if channel_axis else ()) + block_shape, nd)
    scale, translation = source.placement(channel=channel_axis)
    storage.create_image(
        settings.output, out_shape, chunks, settings.dtype, ("c" if channel_axis else "") + source.spatial_axes,
        name="objects", scale=scale, translation=translation, units=source.units,
        overwrite=settings.overwrite, shards=shards,
        attrs={"overtile": {"probabilities": settings.probabilities, "output_kind": "objects", "table": table}},
    )
    if into_image and existed and settings.overwrite:  # being made again: not listed until finished
        storage.unlist_label(into_image, settings.output)
    grid = block_grid(source.spatial_shape, block_shape)
    fresh = settings.overwrite or not existed
    if fresh:
        clear_table(table)
    ledger = storage.Ledger.prepare(settings.output, grid, run, overwrite=fresh)
    group_meta = dict(zarr.open_group(store=settings.output, mode="r").attrs.get("overtile", {}))
    work_url, work_meta = f"{settings.output.rstrip('/')}/{WORK}", {}
    if files.exists(f"{work_url}/zarr.json"):
        if group_meta.get("finished") == run:
            files.remove(work_url)  # left by a run killed just after it finished
        else:
            work_meta = dict(zarr.open_group(store=work_url, mode="r").attrs)
    job = ObjectJob(
        output=settings.output, ledger=ledger, fingerprint=run, settings=settings, spatial_axes=source.spatial_axes,
        spatial_shape=source.spatial_shape, block_shape=block_shape, channel_axis=channel_axis,
        present=_present(source, block_shape), spacing=spacing, unit=unit, image=image, image_axes=image_axes,
        channels=channels, table=table, label_of=into_image, fresh=fresh,
        objects=group_meta.get("objects") if group_meta.get("finished") == run else
        (work_meta.get("objects") if work_meta.get("fingerprint") == run else None),
    )
    return job, job.pending()


def clear_table(table: str) -> None:
    """Remove the table of an earlier run before a fresh one; refuse a path that holds
    anything but Parquet parts (it is not ours to delete)."""
    if not files.exists(table):
        return
    names = files.listdir(table)
    if names is None or any(not n.endswith(".parquet") for n in names):
        raise InputError(f"{table}: exists and is not an object table; choose another --table")
    files.remove(table)


def _is_group(url: str) -> bool:
    try:
        return isinstance(zarr.open(store=url, mode="r"), zarr.Group)
    except Exception:  # noqa: BLE001 - not Zarr: a slide, checked by open_image
        return False


def _present(source: storage.ImageSource, block_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Grid indices of the blocks that hold probabilities: where the probabilities' write units
    are stored (a tissue-masked prediction leaves the rest at the fill value), when those
    (chunks, or shards when sharded) are the blocks; else every block."""
    nd = len(block_shape)
    grid = block_grid(source.spatial_shape, block_shape)
    stored = None
    if storage.write_unit(source.array)[-nd:] == tuple(block_shape) and source.array.ndim == nd + 1:
        stored = storage.stored_chunks(source.array)
    wanted = np.ones(grid, bool) if stored is None else stored.any(axis=0)
    return tuple(tuple(int(i) for i in index) for index in np.argwhere(wanted))


def find_objects(
    settings: ObjectSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[ObjectJob, blockwise.Pending], None] | None = None,
    failures: list[str] | None = None,
) -> tuple[ObjectJob, blockwise.RunSummary]:
    """Label, measure and outline the objects of one class blockwise on Dask; the Python
    entry point behind ``overtile objects`` and the segment flow's ``objects`` option."""
    return blockwise.execute(plan_objects, settings, client, on_plan, on_result, failures)

