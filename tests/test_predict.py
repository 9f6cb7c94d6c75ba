"""Blockwise prediction on a real Dask LocalCluster, Zarr in and Zarr out."""

import os
import signal

import numpy as np
import pytest
import zarr

from pipeline.jobs.blockwise import run_blocks
from pipeline.jobs.predict import PredictSettings, plan_prediction, predict
from pipeline.numerics.geometry import iter_blocks
from pipeline.storage import Ledger
from pipeline.numerics.tiling import overlap_tile, predict_whole, softmax
from pipeline.numerics.unet import load_model

from conftest import cells, make_model, write_zarr


def run(client, image, model, output, **kwargs):
    settings = PredictSettings(input=image, output=str(output), model=str(model), **kwargs)
    job, summary = predict(settings, client=client)
    return zarr.open_group(str(output), mode="r")["0"][...], summary


@pytest.mark.slow
def test_blockwise_equals_whole_image_inference(client, image_2d, model_2d, tmp_path):
    url, data = image_2d
    out, summary = run(client, url, model_2d, tmp_path / "p.zarr", block_size=128, tile_size=300)
    model = load_model(model_2d)
    whole = softmax(predict_whole(model, model.normalization(data[None])))
    np.testing.assert_allclose(out, whole, atol=1e-5)
    assert summary.done == 9 and summary.skipped == 0
    assert np.allclose(out.sum(axis=0), 1, atol=1e-5)


@pytest.mark.slow
def test_output_does_not_depend_on_block_size(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    outs = [run(client, url, model_2d, tmp_path / f"b{b}.zarr", block_size=b, tile_size=t)[0]
            for b, t in [(64, 204), (100, 300), (333, 1212)]]
    for other in outs[1:]:
        assert np.abs(other - outs[0]).max() <= 1e-6


@pytest.mark.slow
def test_bit_identical_whatever_the_worker_count(client, image_2d, model_2d, tmp_path):
    from distributed import Client, LocalCluster

    url, _ = image_2d
    two, _ = run(client, url, model_2d, tmp_path / "two.zarr", block_size=64)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as one_client:
        one, _ = run(one_client, url, model_2d, tmp_path / "one.zarr", block_size=64)
    assert np.array_equal(one, two)


@pytest.mark.slow
def test_labels_are_the_argmax_as_uint8(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    probs, _ = run(client, url, model_2d, tmp_path / "p.zarr", block_size=128)
    labels, _ = run(client, url, model_2d, tmp_path / "l.zarr", block_size=128, output_kind="labels")
    assert labels.dtype == np.uint8 and labels.shape == (1, *probs.shape[1:])
    np.testing.assert_array_equal(labels[0], probs.argmax(axis=0))
    compact, _ = run(client, url, model_2d, tmp_path / "u8.zarr", block_size=128, dtype="uint8")
    assert compact.dtype == np.uint8 and np.abs(compact / 255 - probs).max() <= 0.5 / 255 + 1e-6


@pytest.mark.slow
def test_3d_blockwise_equals_whole_image(client, model_3d, tmp_path):
    data = cells((21, 50, 37), dtype=np.float32)
    url = write_zarr(tmp_path / "v.zarr", data, chunks=(8, 16, 16))
    out, summary = run(client, url, model_3d, tmp_path / "p.zarr", axes="zyx", block_size=16, tile_size=52)
    model = load_model(model_3d)
    np.testing.assert_allclose(out, softmax(predict_whole(model, data[None])), atol=1e-5)
    assert summary.total == 2 * 4 * 3


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(block_size=64, tile_size=204),
    dict(block_size=100, tile_size=300, tta="identity,flip_x,rot90", device_stitch=True),
    dict(block_size=64, output_kind="labels", prefetch=True),
], ids=["plain", "tta-on-device", "labels-prefetched"])
def test_a_2d_model_over_a_stack_predicts_each_slice_as_a_2d_image(client, model_2d, tmp_path, options):
    """A 2-D model over a zyx stack (an EM stack and the net trained on its slices) runs slice
    by slice: each slice of the output equals the slice predicted alone, as a 2-D image, with
    the same options (test-time augmentation, on-device stitching and read-ahead included)."""
    stack = np.stack([cells((150, 170), seed=k) for k in range(3)])
    url = write_zarr(tmp_path / "stack.zarr", stack, chunks=(1, 64, 64))
    out, summary = run(client, url, model_2d, tmp_path / "stack-out.zarr", axes="zyx", **options)
    grid = 3 * 3 if options["block_size"] == 64 else 2 * 2  # per slice: blocks are one slice deep
    assert summary.total == 3 * grid and out.shape[1] == 3
    for k in range(3):
        alone = write_zarr(tmp_path / f"slice{k}.zarr", stack[k])
        want, _ = run(client, alone, model_2d, tmp_path / f"slice{k}-out.zarr", **options)
        np.testing.assert_allclose(out[:, k], want, atol=1e-6)
    model = load_model(model_2d)
    if "tta" not in options and options.get("output_kind") != "labels":
        np.testing.assert_allclose(out[:, 1], softmax(predict_whole(model, model.normalization(stack[1][None]))),
                                   atol=1e-5)


@pytest.mark.slow
def test_a_stack_with_a_tissue_mask_computes_only_the_slices_with_tissue(client, model_2d, tmp_path):
    """Slice by slice, a block's context is in its plane only: tissue in one slice does not
    make the 2-D model's margin (about 90 px) of slices around it computed."""
    from pipeline import storage

    stack = np.stack([cells((64, 64), seed=k) for k in range(5)])
    url = write_zarr(tmp_path / "stack.zarr", stack, chunks=(1, 64, 64))
    mask = np.zeros((5, 32, 32), np.uint8)
    mask[2, 10:20, 10:20] = 1
    storage.create_image(str(tmp_path / "mask.zarr"), mask.shape, mask.shape, "uint8", "zyx")[...] = mask
    out, summary = run(client, url, model_2d, tmp_path / "out.zarr", axes="zyx", block_size=64,
                       tissue_mask=str(tmp_path / "mask.zarr"))
    assert (summary.done, summary.background) == (1, 4)
    assert np.isnan(out[:, [0, 1, 3, 4]]).all() and not np.isnan(out[:, 2]).any()


def test_a_3d_model_over_a_2d_image_is_refused(model_3d, image_2d, tmp_path):
    with pytest.raises(Exception, match="3-D model"):
        plan_prediction(PredictSettings(input=image_2d[0], output=str(tmp_path / "o.zarr"), model=str(model_3d)))


@pytest.mark.slow
def test_rerun_skips_finished_blocks(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    clean, first = run(client, url, model_2d, tmp_path / "p.zarr", block_size=64)
    assert first.done == 30
    # forget three blocks and spoil their pixels, as a run killed mid-way would leave them
    ledger = zarr.open_array(str(tmp_path / "p.zarr" / "ledger"), mode="r+")
    array = zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r+")
    lost = list(iter_blocks(clean.shape[1:], (64, 64)))[5:8]
    for block in lost:
        ledger[block.index] = 0
        array[(slice(None), *block.write.slices())] = np.nan
    again, second = run(client, url, model_2d, tmp_path / "p.zarr", block_size=64)
    assert second.skipped == 27 and second.done == 3
    assert sorted(r["block"] for r in second.records) == sorted(b.key for b in lost)
    assert np.array_equal(again, clean)
    third = run(client, url, model_2d, tmp_path / "p.zarr", block_size=64)[1]
    assert third.done == 0 and third.skipped == 30


@pytest.mark.slow
def test_overwrite_starts_over(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    run(client, url, model_2d, tmp_path / "p.zarr", block_size=128)
    _, summary = run(client, url, model_2d, tmp_path / "p.zarr", block_size=128, overwrite=True)
    assert summary.done == 9 and summary.skipped == 0


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_clean_result(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    clean, _ = run(client, url, model_2d, tmp_path / "clean.zarr", block_size=64)
    settings = PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), block_size=64)
    seen = []

    def stop_after_five(record):
        seen.append(record)
        if len(seen) == 5:
            raise KeyboardInterrupt  # the user presses ^C, or the flow process dies

    with pytest.raises(KeyboardInterrupt):
        predict(settings, client=client, on_result=stop_after_five)
    client.run(lambda: None)  # cancelled tasks may still finish; either way is fine
    _, resumed = predict(settings, client=client)
    assert resumed.skipped >= 5 and resumed.done + resumed.skipped == 30
    assert np.array_equal(zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r")[...], clean)


@pytest.mark.slow
def test_killed_worker_still_yields_complete_bit_identical_output(image_2d, model_2d, tmp_path):
    from distributed import Client, LocalCluster

    url, _ = image_2d
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        clean, _ = run(c, url, model_2d, tmp_path / "clean.zarr", block_size=32)
        pids = c.run(os.getpid)
        killed = []

        def kill_one_worker(record):
            if not killed:
                victim = next(pid for pid in pids.values() if pid != record["worker_pid"])
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        settings = PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), block_size=32)
        _, summary = predict(settings, client=c, on_result=kill_one_worker)
        assert killed and summary.done == 99
        assert set(c.run(os.getpid).values()).isdisjoint(killed)  # the nanny started a new worker
    out = zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r")[...]
    assert np.array_equal(out, clean)
    assert Ledger(str(tmp_path / "p.zarr" / "ledger"), (11, 9)).done().all()


def test_in_memory_url_with_threaded_cluster(image_2d, model_2d):
    from distributed import Client, LocalCluster

    _, data = image_2d
    url = write_zarr("memory://overtile-predict/in.zarr", data)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        out, summary = run(c, url, model_2d, "memory://overtile-predict/out.zarr", block_size=200)
    model = load_model(model_2d)
    np.testing.assert_allclose(out, softmax(overlap_tile(model, model.normalization(data[None]), 300)), atol=1e-5)


def test_block_tasks_request_the_gpu_resource(tmp_path):
    """Tasks that ask for ``GPU`` go only to workers that offer it (as CUDA blocks do)."""
    from distributed import Client, LocalCluster

    from pipeline.numerics.geometry import Block, Box

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        cluster.scale(0)
        with Client(cluster) as c:
            from distributed import Worker

            gpu = c.sync(Worker, cluster.scheduler_address, resources={"GPU": 1}, nthreads=1)
            cpu = c.sync(Worker, cluster.scheduler_address, nthreads=1)
            try:
                blocks = [Block((i,), Box((i,), (1,))) for i in range(6)]
                records = run_blocks(c, _OnTheGpu(), blocks)
                assert {r["worker"] for r in records} == {gpu.address}
                # read-ahead too: reads on a CPU worker would run ahead of the GPU without bound
                # and ship every block's input to the GPU worker, which holds them all
                records = run_blocks(c, _OnTheGpuAhead(), blocks)
                assert {r["worker"] for r in records} == {r["read_on"] for r in records} == {gpu.address}
            finally:
                c.sync(cpu.close)
                c.sync(gpu.close)


class _OnTheGpu:
    """A blockwise job whose blocks need the GPU and say which worker ran them."""

    name, gpu, prefetch = "where", True, False

    def run_block(self, block):
        from distributed import get_worker

        return {"worker": get_worker().address, "pixels": 1}


class _OnTheGpuAhead(_OnTheGpu):
    """The same with read-ahead: each block's read is a task of its own."""

    name, prefetch = "ahead", True

    def read_block(self, block):
        from distributed import get_worker

        return get_worker().address

    def run_block(self, block, read_on):
        return {**super().run_block(block), "read_on": read_on}


def test_plan_reports_what_is_left(image_2d, model_2d, tmp_path):
    url, _ = image_2d
    settings = PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), block_size=100)
    job, pending = plan_prediction(settings)
    assert len(pending.blocks) == 12 and pending.skipped == 0
    assert job.tile_size == 1212 and job.block_shape == (100, 100)


@pytest.mark.slow
def test_scheduler_address_uses_an_existing_cluster(image_2d, model_2d, tmp_path):
    from distributed import LocalCluster

    url, _ = image_2d
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        settings = PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d),
                                   block_size=128, scheduler=cluster.scheduler_address)
        _, summary = predict(settings)  # no client given: connects to the address
        assert summary.done == 9
        assert len({r["worker_pid"] for r in summary.records}) == 1


@pytest.mark.slow
def test_prefetched_reads_give_the_same_output(client, image_2d, model_2d, tmp_path):
    """The GPU path's read-ahead (a read task per block, its result handed to the compute
    task) changes the schedule, not the numbers; run here on CPU."""
    url, _ = image_2d
    plain, _ = run(client, url, model_2d, tmp_path / "plain.zarr", block_size=64, pyramid=False)
    ahead, summary = run(client, url, model_2d, tmp_path / "ahead.zarr", block_size=64, pyramid=False, prefetch=True)
    assert np.array_equal(plain, ahead) and summary.done == 30
    assert all("read_s" not in r for r in summary.records)  # the compute tasks did not read


BF16_TOLERANCE = 0.02  # max |p_bf16 - p_float32| of a probability, as README states


@pytest.mark.slow
def test_bf16_autocast_stays_within_the_stated_tolerance_and_fp32_is_float32(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    exact, _ = run(client, url, model_2d, tmp_path / "f32.zarr", block_size=128, pyramid=False)
    mixed, _ = run(client, url, model_2d, tmp_path / "bf16.zarr", block_size=128, pyramid=False, autocast="bf16")
    error = np.abs(mixed - exact).max()
    assert 0 < error <= BF16_TOLERANCE
    strict, _ = run(client, url, model_2d, tmp_path / "strict.zarr", block_size=128, pyramid=False, autocast="fp32")
    assert np.array_equal(strict, exact)  # on CPU torch's float32 is strict already (no TF32)


def test_cuda_is_planned_on_trust_for_a_remote_cluster(image_2d, model_2d, tmp_path):
    """A login node or CPU pod plans runs for GPU workers elsewhere; locally, cuda without a
    GPU is a clear error."""
    import torch

    url, _ = image_2d
    remote = PredictSettings(input=url, output=str(tmp_path / "r.zarr"), model=str(model_2d), device="cuda",
                             scheduler="tcp://10.0.0.5:8786")
    assert plan_prediction(remote)[0].device == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            plan_prediction(remote.model_copy(update={"scheduler": None, "output": str(tmp_path / "l.zarr")}))


def test_ledger_lists_finished_blocks_without_reading_the_others(tmp_path, monkeypatch):
    """A terabyte slide's ledger has hundreds of thousands of blocks: done() must list the
    few stored chunks, not read every one."""
    from pipeline.numerics.geometry import block_at

    zarr.open_group(str(tmp_path / "o.zarr"), mode="w")
    ledger = Ledger.prepare(str(tmp_path / "o.zarr"), (586, 586), "fingerprint", overwrite=False)
    marked = [(4, 4), (0, 585), (300, 7)]
    for index in marked:
        ledger.mark(block_at(index, (1_200_000, 1_200_000), (2048, 2048)))

    def no_reading(*args, **kwargs):
        raise AssertionError("the ledger was read chunk by chunk")

    monkeypatch.setattr(zarr.Array, "__getitem__", no_reading)
    done = ledger.done()
    assert done.shape == (586, 586) and set(map(tuple, np.argwhere(done))) == set(marked)


@pytest.mark.slow
def test_two_outputs_of_the_same_run_never_share_dask_tasks(client, image_2d, model_2d, tmp_path):
    """Dask keys name the output too: the same settings into two outputs, submitted together
    to one scheduler, must both be written (shared keys would make Dask run one of them)."""
    import threading

    url, _ = image_2d
    jobs = [PredictSettings(input=url, output=str(tmp_path / f"{n}.zarr"), model=str(model_2d), block_size=128,
                            pyramid=False) for n in ("a", "b")]
    assert plan_prediction(jobs[0])[0].name != plan_prediction(jobs[1])[0].name
    threads = [threading.Thread(target=predict, args=(s,), kwargs={"client": client}) for s in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = (zarr.open_array(str(tmp_path / f"{n}.zarr" / "0"), mode="r")[...] for n in ("a", "b"))
    assert not np.isnan(a).any() and np.array_equal(a, b)


@pytest.mark.slow
def test_compiled_model_gives_the_same_output_and_reports_its_compile_time(tmp_path):
    """--compile: torch.compile once per worker process, reused across blocks (four blocks of
    one tile shape: one compile); the output equals the eager run's within float rounding,
    and the block that compiled says how long it took."""
    from distributed import Client, LocalCluster

    url = write_zarr(tmp_path / "in.zarr", cells((256, 256)))
    model = make_model(tmp_path / "m.pt", depth=3, base_channels=4)
    settings = PredictSettings(input=url, output=str(tmp_path / "eager.zarr"), model=str(model), block_size=128,
                               tile_size=140, compile=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        predict(settings, client=c)
        job, summary = predict(settings.model_copy(update={"output": str(tmp_path / "compiled.zarr"), "compile": True}),
                               client=c)
    assert job.compile
    compile_times = sorted((r["compile_s"] for r in summary.records), reverse=True)
    notes = {r.get("compile_note", "") for r in summary.records}
    if notes != {""}:
        pytest.skip(f"torch.compile cannot run here: {notes}")
    assert len(compile_times) == 4 and compile_times[0] > 0 and compile_times[1:] == [0.0, 0.0, 0.0]
    eager = zarr.open_array(str(tmp_path / "eager.zarr" / "0"))[...]
    compiled = zarr.open_array(str(tmp_path / "compiled.zarr" / "0"))[...]
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_compile_defaults_to_on_only_for_gpu_jobs_long_enough_to_pay_for_it(image_2d, model_2d, tmp_path):
    """On a CPU compiling is off unless asked for (it bought nothing in a worker, and each tile
    shape compiles again); on a GPU, on for jobs of enough blocks per task slot."""
    from pipeline.jobs.inference import COMPILE_BREAK_EVEN_BLOCKS

    url, _ = image_2d
    small = PredictSettings(input=url, output=str(tmp_path / "a.zarr"), model=str(model_2d), block_size=128, workers=1)
    assert not plan_prediction(small)[0].compile  # 9 blocks
    many = small.model_copy(update={"output": str(tmp_path / "b.zarr"), "block_size": 16})
    assert 22 * 17 >= COMPILE_BREAK_EVEN_BLOCKS and not plan_prediction(many)[0].compile  # a CPU
    on_gpu = many.model_copy(update={"output": str(tmp_path / "g.zarr"), "device": "cuda"})
    assert plan_prediction(on_gpu, remote=True)[0].compile  # planned on trust, as for a remote cluster
    assert not plan_prediction(small.model_copy(update={"output": str(tmp_path / "h.zarr"), "device": "cuda"}),
                               remote=True)[0].compile
    forced = small.model_copy(update={"output": str(tmp_path / "c.zarr"), "compile": True})
    assert plan_prediction(forced)[0].compile


# --- GPU workers (their placement only: no test needs a GPU) ---------------------------------


def test_a_local_gpu_cluster_has_workers_per_core_pair_and_per_share_of_gpu_memory():
    import torch

    from pipeline.jobs.blockwise import GPU_WORKER_MEMORY_GIB, default_gpu_workers, gpu_workers

    if not torch.cuda.is_available():
        assert default_gpu_workers() == 1

    # memory as torch reports it (total_memory / 2**30), a little under the card's name
    assert gpu_workers(16, [139.8]) == 8  # an H200 on 16 cores: cores decide (bench/gpu.py's best)
    assert gpu_workers(16, [23.64]) == 24 // GPU_WORKER_MEMORY_GIB == 2  # a 24 GB card: its memory decides
    assert gpu_workers(16, [39.6]) == 3 and gpu_workers(16, [79.25]) == 6  # A100s of 40 and 80 GB
    assert gpu_workers(16, [79.25, 79.25]) == 8  # two GPUs share the cores: 4 each
    assert gpu_workers(2, [7.8]) == 1 and gpu_workers(1, [139.8, 139.8]) == 2  # at least one per GPU
    assert gpu_workers(16, []) == 1


@pytest.mark.slow
def test_local_cluster_workers_take_the_gpus_in_turn(client):
    from pipeline.jobs.inference import worker_gpu

    assert worker_gpu(4) == 0  # outside a worker: the first GPU
    workers = client.scheduler_info()["workers"]  # in a task on each, as the block tasks ask
    names = {w: info["name"] for w, info in workers.items()}
    gpus = {w: client.submit(worker_gpu, 2, workers=[w], pure=False).result() for w in workers}
    assert {names[w]: gpus[w] for w in workers} == {0: 0, 1: 1}
    assert [client.submit(worker_gpu, 1, workers=[w], pure=False).result() for w in workers] == [0, 0]  # one GPU
