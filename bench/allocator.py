"""The allocator trap: what Dask's Nanny does to a forward pass's memory, and the fix.

Dask's Nanny starts every worker process with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
``distributed.nanny.pre-spawn-environ`` config). glibc then hands each forward pass's freed
activations (tens of MB per layer) back to the kernel and page-faults them in again on the
next pass: the same user time, several times the kernel time. This script measures one
forward pass of the 16-base valid 2-D U-Net (depth 5, ``channels_last``, one torch thread,
``torch.inference_mode``) on a 1212² tile, averaged over ``--passes`` passes after
``--warmup`` passes, per pass: wall, user and system CPU seconds and minor page faults
(``resource.getrusage`` of the whole process), in

(a)  a plain subprocess with glibc's defaults (in the main thread, and in a second thread:
     a Dask task runs in a thread of the worker's pool, whose malloc arena is not the main
     one);
(b)  a plain subprocess with ``MALLOC_TRIM_THRESHOLD_=65536``, what the Nanny sets;
(c)  plain subprocesses with "keep the memory" settings, and the variants that show which
     variable does what;
(f)  jemalloc and tcmalloc through ``LD_PRELOAD``, where Debian's ``libjemalloc2`` and
     ``libtcmalloc-minimal4`` are installed (informational: overtile cannot ask its users
     for apt packages);
(d)  a task in a real ``LocalCluster`` worker (processes, 1 worker, 1 thread), Dask's defaults;
(e)  the same with the keep setting given the ways one might give it (the right one, the
     wrong one, and the traps below);
(g)  a worker started by the ``dask worker`` command line, the keep setting in its
     environment or in the ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON`` variable.

Every row also records the allocator variables in the measuring process's initial
environment (``/proc/self/environ``, what glibc read at start) and in ``os.environ`` (what
Python sees now); the two differ when a variable was set after the process started.

How Dask applies the worker environment (distributed 2026.8, ``distributed/nanny.py``)
----------------------------------------------------------------------------------------
* ``distributed.nanny.pre-spawn-environ`` is read when the Nanny is created, and the Nanny
  puts it into *its own* ``os.environ`` before it spawns the worker, so the worker starts
  with it. In a LocalCluster the nannies live in the client's process: after the first
  cluster starts, the client process itself carries ``MALLOC_TRIM_THRESHOLD_=65536`` (and
  ``OMP_NUM_THREADS=1``) and passes them to every subprocess it starts afterwards.
* For each key of the config, a variable already in the Nanny process's environment wins
  over the config's value (``_get_env_variables``: ``os.environ.get(k, config_value)``).
  So once a first LocalCluster has leaked 65536 into the client, a second LocalCluster
  configured with a large ``MALLOC_TRIM_THRESHOLD_`` still gets 65536 (row e3); setting
  the variables in ``os.environ`` before the cluster starts always works (row e4).
* ``distributed.nanny.environ`` (and ``Nanny(env=...)``) are applied by ``os.environ.update``
  inside the worker process after it has started: too late for glibc, which reads its
  ``MALLOC_*`` variables at process start. The worker's ``os.environ`` then *shows* the
  value, but the allocator never saw it (row e2): check ``/proc/self/environ``.
* ``dask worker`` (the CLI) creates the same Nannies in its own process, so it honours the
  same config, and variables in its own environment win as above (rows g1, g2). With
  ``--no-nanny`` there is no pre-spawn step: the CLI process's own environment is what counts.
* Per-key config variables do not work for these: dask lower-cases keys taken from
  ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_MMAP_MAX_=0``, so the worker gets a
  variable ``malloc_mmap_max_`` that glibc ignores. The whole dict as one Python literal,
  ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{"MALLOC_MMAP_MAX_": 0, ...}'``, keeps the
  case and is merged with the defaults (row g2); so is a YAML file in ``DASK_CONFIG``.

glibc facts behind the rows (2.36)
----------------------------------
* Allocations above the mmap threshold get their own ``mmap`` and are unmapped on free, so
  each pass faults them in again. The threshold starts at 128 KiB and grows (up to 32 MiB)
  as such blocks are freed, unless any of ``MALLOC_TRIM_THRESHOLD_``,
  ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_`` is set, which
  freezes it: the Nanny's setting thus also keeps every allocation over 128 KiB in mmap.
* A 1212² × 16-channel float32 activation is 94 MB: above the largest threshold glibc
  reaches by itself (32 MiB), so with the defaults every pass maps and unmaps it (row a),
  and ``MALLOC_MMAP_THRESHOLD_=32MiB`` does not help (row c3). Either no mmap at all
  (``MALLOC_MMAP_MAX_=0``, row c1) or a threshold above the largest allocation
  (``MALLOC_MMAP_THRESHOLD_=1GiB``, row c4; glibc 2.36 accepts it) keeps it in the heap;
  the first does not depend on the tile size.
* With mmap off, a large trim threshold keeps the freed top of the heap for the next pass.
  That is enough in the main thread, but a Dask task runs in a pool thread, whose malloc
  arena is made of 64 MiB heaps that glibc unmaps as soon as one is wholly free, whatever
  the trim threshold: in a second thread the pass faults its memory in again (rows c1-t,
  e0). ``MALLOC_ARENA_MAX=1`` puts every thread on the main arena (one heap, trimmed only
  past the threshold) and removes that too (rows c8-t, e1).

The environment overtile should give its workers
------------------------------------------------
The best rows (fewest faults, least kernel time, the same user time) are c8-t and e1::

    WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                  "MALLOC_TRIM_THRESHOLD_": "1099511627776"}

(a 1 TiB trim threshold: never trim; 1 GiB measured the same for 1212² tiles but would trim
again with bigger tiles or batches). Put it in ``distributed.nanny.pre-spawn-environ``
merged over Dask's defaults (keep ``OMP_NUM_THREADS=1`` etc.) *and* in ``os.environ``
before starting a LocalCluster (an inherited ``MALLOC_TRIM_THRESHOLD_`` beats the config),
and in the environment of ``dask worker`` commands in job scripts and pod specs. The
``GLIBC_TUNABLES`` spelling (row c9-t) does the same. The cost: a worker keeps its peak heap
(a pass's activations) resident between passes instead of returning it; the peak itself
does not change. One arena serialises malloc calls between a worker's threads, which matters
little for a few hundred large tensors per pass.

Usage::

    .venv/bin/python bench/allocator.py --json bench/out/allocator.json   # full (~8 min quiet)
    .venv/bin/python bench/allocator.py --quick                           # 572² tile, 2 passes
    .venv/bin/python bench/allocator.py --only a b c1 d e1                # some rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.numerics.unet import UNet

NO_TRIM = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
KEEP = {"MALLOC_ARENA_MAX": "1", **NO_TRIM}
"""The best setting found (see the module docstring): one arena, no mmap, never trim."""

NANNY = {"MALLOC_TRIM_THRESHOLD_": "65536"}
ALLOCATOR_VARS = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


# --- the measurement (runs in the measured process: plain child or Dask worker) ----------


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(ALLOCATOR_VARS)}


def initial_env() -> dict[str, str]:
    """The environment this process was started with: what glibc read."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return allocator_env(dict(pairs))


def measure(size: int, passes: int, warmup: int, base: int = 16, channels_last: bool = True) -> dict[str, Any]:
    """Forward passes of the valid U-Net in this thread; per-pass means of wall, CPU and faults."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=2, base_channels=base).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(1, 1, size, size).contiguous(memory_format=fmt)
    rows = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(passes):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            y = model(x)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            del y
            rows.append({"wall_s": t1 - t0, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                         "minflt": r1.ru_minflt - r0.ru_minflt, "majflt": r1.ru_majflt - r0.ru_majflt})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {**mean, "passes": rows, "min_wall_s": min(r["wall_s"] for r in rows),
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads(), "main_thread": threading.current_thread() is threading.main_thread(),
            "initial_env": initial_env(), "os_environ": allocator_env(dict(os.environ)), "pid": os.getpid(),
            "out_size": model.output_size(size)}


def measure_in_thread(size: int, passes: int, warmup: int, base: int) -> dict[str, Any]:
    """:func:`measure` in a second thread (another malloc arena), as a Dask task runs."""
    box: dict[str, Any] = {}

    def target() -> None:
        box["result"] = measure(size, passes, warmup, base)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return box["result"]


# --- children ------------------------------------------------------------------------------


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    run = measure_in_thread if spec["thread"] else measure
    return run(spec["size"], spec["passes"], spec["warmup"], spec["base"])


def cluster_measure(client: Any, spec: dict[str, Any]) -> dict[str, Any]:
    future = client.submit(measure, spec["size"], spec["passes"], spec["warmup"], spec["base"], pure=False)
    return future.result()


def child_cluster(spec: dict[str, Any]) -> dict[str, Any]:
    """A task in a 1-worker, 1-thread LocalCluster, its environment given as ``spec['how']``."""
    import dask
    from distributed import Client, LocalCluster

    how = spec["how"]
    config: dict[str, Any] = {}
    default_pre = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if how in ("pre-spawn", "pre-spawn-after-default"):
        config["distributed.nanny.pre-spawn-environ"] = {**default_pre, **KEEP}
    elif how == "pre-spawn-no-trim":
        config["distributed.nanny.pre-spawn-environ"] = {**default_pre, **NO_TRIM}
    elif how == "environ":
        config["distributed.nanny.environ"] = dict(KEEP)
    elif how == "os-environ":
        os.environ.update(KEEP)
    kwargs = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    leaked = None
    if how == "pre-spawn-after-default":  # a first cluster, as an earlier run in this process would
        with LocalCluster(**kwargs) as first, Client(first):
            pass
        leaked = allocator_env(dict(os.environ))
    with dask.config.set(config), LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        client_env = allocator_env(dict(os.environ))
        result = cluster_measure(client, spec)
    return {**result, "client_os_environ_after_start": client_env, "client_os_environ_before_second": leaked}


def child_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """A task on a worker that ``dask worker`` started (with its Nanny), env given as ``spec['how']``."""
    from distributed import Client

    dask_cli = str(Path(sys.executable).with_name("dask"))
    tmp = Path(tempfile.mkdtemp(prefix="overtile-alloc-"))
    sched_file = tmp / "scheduler.json"
    base_env = clean_env()
    worker_env = dict(base_env)
    if spec["how"] == "cli-env":
        worker_env.update(KEEP)
    elif spec["how"] == "cli-dask-config":
        worker_env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"] = repr({k: int(v) for k, v in KEEP.items()})
    procs = []
    try:
        procs.append(subprocess.Popen([dask_cli, "scheduler", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                                       "--port", "0", "--no-dashboard"], env=base_env, cwd=tmp,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.2)
        time.sleep(0.5)
        procs.append(subprocess.Popen([dask_cli, "worker", "--scheduler-file", str(sched_file), "--nworkers", "1",
                                       "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"], env=worker_env, cwd=tmp,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        with Client(scheduler_file=str(sched_file)) as client:
            client.wait_for_workers(1, timeout=120)
            return {**cluster_measure(client, spec), "cli_env": allocator_env(worker_env),
                    "cli_dask_config": worker_env.get("DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON")}
    finally:
        for p in reversed(procs):  # only the processes this function started, by their group
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


CHILDREN = {"plain": child_plain, "cluster": child_cluster, "cli": child_cli}


# --- the rows (parent) ----------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment without allocator, preload or Dask config variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ALLOCATOR_VARS + ("DASK_",))}


def rows() -> list[dict[str, Any]]:
    """Every configuration: label, description, kind (plain/cluster/cli), env or how."""
    big, gib = str(2**40), str(2**30)
    r = [
        ("a", "glibc defaults", "plain", {}, False),
        ("a-t", "glibc defaults, in a second thread", "plain", {}, True),
        ("b", "MALLOC_TRIM_THRESHOLD_=65536 (the Nanny's)", "plain", NANNY, False),
        ("b-t", "MALLOC_TRIM_THRESHOLD_=65536, in a second thread", "plain", NANNY, True),
        ("c1", "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1TiB (no mmap, no trim)", "plain", NO_TRIM, False),
        ("c1-t", "no mmap, no trim, in a second thread", "plain", NO_TRIM, True),
        ("c2", "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1GiB", "plain",
         {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": gib}, False),
        ("c3", "MALLOC_MMAP_THRESHOLD_=32MiB (glibc's max) MALLOC_TRIM_THRESHOLD_=1TiB", "plain",
         {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": big}, False),
        ("c4", "MALLOC_MMAP_THRESHOLD_=1GiB MALLOC_TRIM_THRESHOLD_=1TiB", "plain",
         {"MALLOC_MMAP_THRESHOLD_": gib, "MALLOC_TRIM_THRESHOLD_": big}, False),
        ("c5", "MALLOC_MMAP_MAX_=0 only", "plain", {"MALLOC_MMAP_MAX_": "0"}, False),
        ("c6", "MALLOC_TRIM_THRESHOLD_=1TiB only", "plain", {"MALLOC_TRIM_THRESHOLD_": big}, False),
        ("c7-t", "MALLOC_ARENA_MAX=1 only, in a second thread", "plain", {"MALLOC_ARENA_MAX": "1"}, True),
        ("c8", "KEEP: no mmap, no trim, MALLOC_ARENA_MAX=1", "plain", KEEP, False),
        ("c8-t", "KEEP, in a second thread", "plain", KEEP, True),
        ("c9-t", "KEEP as GLIBC_TUNABLES=glibc.malloc.arena_max=1:mmap_max=0:trim_threshold=1TiB, in a second thread",
         "plain", {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={big}"},
         True),
    ]
    out = [{"label": a, "what": b, "kind": c, "env": d, "thread": e} for a, b, c, d, e in r]
    for label, what, lib in (("f1", "jemalloc (LD_PRELOAD)", JEMALLOC), ("f2", "tcmalloc-minimal (LD_PRELOAD)", TCMALLOC)):
        if os.path.exists(lib):
            out.append({"label": label, "what": what, "kind": "plain", "env": {"LD_PRELOAD": lib}, "thread": False})
            out.append({"label": label + "-t", "what": what + ", in a second thread", "kind": "plain",
                        "env": {"LD_PRELOAD": lib}, "thread": True})
    cluster = [
        ("d", "LocalCluster worker, Dask's default nanny environment", "cluster", "default"),
        ("e0", "LocalCluster, no mmap + no trim (no MALLOC_ARENA_MAX) in pre-spawn-environ", "cluster",
         "pre-spawn-no-trim"),
        ("e1", "LocalCluster, KEEP in distributed.nanny.pre-spawn-environ", "cluster", "pre-spawn"),
        ("e2", "LocalCluster, KEEP in distributed.nanny.environ (applied after start)", "cluster", "environ"),
        ("e3", "LocalCluster, KEEP in pre-spawn-environ, after a default cluster in the same process", "cluster",
         "pre-spawn-after-default"),
        ("e4", "LocalCluster, KEEP set in the client's os.environ first (no config)", "cluster", "os-environ"),
        ("g1", "`dask worker` CLI, KEEP in its environment", "cli", "cli-env"),
        ("g2", "`dask worker` CLI, DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{...}'", "cli", "cli-dask-config"),
    ]
    out += [{"label": a, "what": b, "kind": c, "how": d} for a, b, c, d in cluster]
    return out


def run_row(row: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = {**row, "size": args.size, "passes": args.passes, "warmup": args.warmup, "base": args.base}
    spec_path, result_path = workdir / f"{row['label']}.spec.json", workdir / f"{row['label']}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = clean_env()
    if row["kind"] == "plain":
        env.update(row["env"])
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(spec_path),
                           "--result", str(result_path)], env=env, timeout=1800, check=False)
    if proc.returncode != 0 or not result_path.exists():
        return {**row, "error": f"exit status {proc.returncode}"}
    return {**row, **json.loads(result_path.read_text()), "child_s": time.perf_counter() - t}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1212, help="tile input edge (default 1212, valid for depth 5)")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--passes", type=int, default=5, help="timed forward passes per row (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    p.add_argument("--quick", action="store_true", help="572² tile, 1 warm-up and 2 timed passes: a smoke test")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="run only these rows (labels as printed)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.passes, args.warmup = 572, 2, 1
    return args


def env_note(r: dict[str, Any]) -> str:
    """The allocator variables the measured process started with, and what os.environ adds."""
    start = {k: v for k, v in r["initial_env"].items() if k != "OMP_NUM_THREADS"}
    # glibc cuts GLIBC_TUNABLES in place while parsing it at start: /proc shows a piece of it
    later = {k: v for k, v in r["os_environ"].items()
             if r["initial_env"].get(k) != v and k not in ("OMP_NUM_THREADS", "GLIBC_TUNABLES")}
    note = " ".join(f"{k}={v}" for k, v in start.items()) or "(none)"
    if later:
        note += " | os.environ only: " + " ".join(f"{k}={v}" for k, v in later.items())
    return note


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\none forward pass, {args.size}² → {results[0].get('out_size', '?')}², base {args.base}, channels_last, "
          f"1 torch thread; mean of {args.passes} passes after {args.warmup}")
    head = ("row", "setting", "wall s", "user s", "sys s", "minflt k", "maxrss MiB", "allocator env at process start")
    table = [head]
    for r in results:
        if "error" in r:
            table.append((r["label"], r["what"], "failed", r["error"], "", "", "", ""))
            continue
        table.append((r["label"], r["what"], f"{r['wall_s']:.3f}", f"{r['user_s']:.3f}", f"{r['sys_s']:.3f}",
                      f"{r['minflt'] / 1e3:.1f}", f"{r['maxrss_mib']:.0f}", env_note(r)))
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for i, t in enumerate(table):
        print("| " + " | ".join(c.ljust(w) if j in (0, 1, 7) else c.rjust(w) for j, (c, w) in enumerate(zip(t, widths)))
              + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    ok = [r for r in results if "error" not in r]
    by = {r["label"]: r for r in ok}
    for r in ok:
        if r.get("client_os_environ_before_second") is not None:
            print(f"{r['label']}: the client's os.environ after the first (default) cluster: "
                  f"{r['client_os_environ_before_second']}")
        if r.get("client_os_environ_after_start") is not None and r["label"] == "d":
            print(f"d: the client's os.environ once the LocalCluster started (the Nanny's leak): "
                  f"{r['client_os_environ_after_start']}")
    if "a" in by:
        base = by["a"]
        print("\nrelative to (a) glibc defaults, main thread: wall / sys")
        for r in ok:
            print(f"  {r['label']:5s} {r['wall_s'] / base['wall_s']:.3f} / {r['sys_s'] / max(base['sys_s'], 1e-9):.3f}"
                  f"   {r['what']}")
    print()
    for where, thread in (("the main thread", False), ("a second thread (as a Dask task runs)", True)):
        plain = [r for r in ok if r["kind"] == "plain" and not r["label"].startswith("f") and r["thread"] == thread]
        if plain:
            best = min(plain, key=lambda r: (r["sys_s"], r["wall_s"]))
            print(f"least kernel time in a plain process, {where}: {best['label']} ({best['what']}): "
                  f"{best['wall_s']:.3f} s wall, {best['sys_s']:.3f} s sys, {best['minflt'] / 1e3:.1f}k faults per pass")
    print(f"overtile's workers get {KEEP}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child.read_text())
        args.result.write_text(json.dumps(CHILDREN[spec["kind"]](spec)))
        return 0
    todo = [r for r in rows() if not args.only or r["label"] in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="overtile-allocator-"))
    print(f"allocator benchmark: {len(todo)} rows, {args.size}² tile, torch {torch.__version__}, "
          f"{len(os.sched_getaffinity(0))} cores", flush=True)
    results = []
    t_all = time.perf_counter()
    try:
        for row in todo:
            r = run_row(row, args, workdir)
            results.append(r)
            msg = r.get("error") or (f"{r['wall_s']:.3f} s wall, {r['sys_s']:.3f} s sys, {r['minflt'] / 1e3:.1f}k faults "
                                     f"per pass ({r['child_s']:.0f} s)")
            print(f"  {row['label']:5s} {row['what']}: {msg}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "keep": KEEP,
                                         "torch": torch.__version__, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
