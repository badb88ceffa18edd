"""Scoring on a Dask cluster (``score --dask ADDRESS``, ``score(..., client=...)``).

The samples are split into shards of consecutive rows (``minsharp_ref.shards``). Each
shard is one Dask task that runs ``score_shard``, the function a local run uses, on a
worker and returns float64 sums; the client adds them in shard order, so the result does
not depend on which worker finished first (docs/method.md section 7, "Shards"). The model
is scattered to the workers once. By default each task reads its own rows of the .npz
(the workers must see the file at the same absolute path); with ``scatter_data`` the
client reads the rows and ships them, a few shards ahead of the workers. A worker that
dies has its shards recomputed elsewhere by Dask; a shard that fails on bad input fails
the run with its one-line ``MinsharpError``. See docs/dask.md.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .errors import MinsharpError, first_line

INSTALL = "pip install 'minsharp-ref[dask]'"
#: With scatter_data: shards shipped ahead of the results, per worker.
SHARDS_IN_FLIGHT_PER_WORKER = 2
#: Batches a task runs at once: one, since each Dask worker thread runs a task (a local run
#: uses ``RunOptions.workers`` threads instead). The numbers do not depend on it.
THREADS_PER_TASK = 1


def _distributed():
    try:
        import distributed
    except ImportError:
        raise MinsharpError(f"--dask needs Dask's distributed scheduler: {INSTALL}") from None
    return distributed


@contextmanager
def connect(address: str) -> Iterator:
    """A ``distributed.Client`` for ``address``: ``tcp://host:port`` (a running scheduler)
    or ``local:N`` (a LocalCluster of N single-threaded worker processes on this machine,
    started for this run and closed afterwards)."""
    n = None
    if address.startswith("local:"):
        n = int(address[6:]) if address[6:].isdigit() else 0
        if n < 1:
            raise MinsharpError(f"--dask {address!r}: use local:N with N ≥ 1 worker processes, "
                                "or a scheduler address like tcp://host:8786")
    distributed = _distributed()
    if n is not None:
        import dask

        # Dask's default MALLOC_TRIM_THRESHOLD_ for workers makes glibc map and unmap every
        # large temporary array: the engine runs about 1.6x slower (docs/dask.md)
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.ERROR)
        with cluster, distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = distributed.Client(address, timeout="30s")
    except (OSError, ValueError, TypeError) as exc:
        raise MinsharpError(f"--dask {address}: cannot connect to the scheduler "
                            f"({first_line(exc)})") from None
    with client:
        yield client


def _version() -> str:
    """minsharp-ref's version on a worker (run there by the client)."""
    from . import __version__

    return __version__


def check_workers(client) -> int:
    """The number of workers; refuse a cluster without any, or whose workers run another
    version of minsharp-ref (or none)."""
    from . import __version__

    address = client.scheduler.address
    try:
        versions = client.run(_version)
    except ImportError as exc:
        raise MinsharpError(f"the Dask workers at {address} cannot import minsharp_ref "
                            f"({first_line(exc)}): install minsharp-ref on every worker") from None
    if not versions:
        raise MinsharpError(f"the Dask cluster at {address} has no workers")
    other = {w: v for w, v in versions.items() if v != __version__}
    if other:
        worker, version = next(iter(other.items()))
        raise MinsharpError(f"Dask worker {worker} runs minsharp-ref {version}, this client "
                            f"{__version__}: install the same version everywhere")
    return len(versions)


def run_shards(client, imported, spec, ranges: list[tuple[int, int]], options,
               progress: Optional[Callable[[int], None]] = None,
               scatter_data: bool = False) -> tuple[list, dict]:
    """Score each (start, stop) range with ``score_shard`` on the workers of ``client``.
    ``options`` (a ``RunOptions``) reaches every task as it is, but for ``workers``:
    THREADS_PER_TASK, since each Dask worker thread runs one task.
    Returns the shards' EngineRuns in shard order and the report's ``distributed`` object.
    On failure, raises the error of the lowest failing shard (as a local run would)."""
    from .shards import score_shard

    distributed = _distributed()
    start = time.perf_counter()
    workers = check_workers(client)
    options = options.but(workers=THREADS_PER_TASK)
    model = client.scatter(imported, broadcast=True, hash=False)
    dataset = spec.open() if scatter_data else None
    shards = iter(enumerate(ranges))
    index: dict = {}  # future → shard number
    results: list = [None] * len(ranges)
    done = distributed.as_completed()

    def submit_next():
        for i, (a, b) in shards:
            rows = client.scatter(dataset.rows(a, b), hash=False) if scatter_data else None
            future = client.submit(score_shard, model, spec, a, b, options, rows, pure=False)
            index[future] = i
            done.add(future)
            return

    try:
        ahead = workers * SHARDS_IN_FLIGHT_PER_WORKER if scatter_data else len(ranges)
        for _ in range(ahead):
            submit_next()
        failed = None
        for future in done:
            i = index.pop(future)
            if future.status != "finished":
                failed = i
                break
            results[i] = future.result()
            future.release()
            if progress:
                progress(ranges[i][1] - ranges[i][0])
            submit_next()
        if failed is not None:
            _raise_first_error(distributed, client, index, failed, future, ranges)
    finally:
        client.cancel(list(index))
        if dataset is not None:
            dataset.close()
    info = {"scheduler": client.scheduler.address, "workers": workers, "shards": len(ranges),
            "shard_size": ranges[0][1] - ranges[0][0], "scatter_data": scatter_data,
            "seconds": time.perf_counter() - start}
    return results, info


def _raise_first_error(distributed, client, index: dict, failed: int, future, ranges):
    """Wait for the shards before the failed one and raise the lowest shard's error."""
    client.cancel([f for f, i in index.items() if i > failed])
    before = {f: i for f, i in index.items() if i < failed}
    distributed.wait(list(before))
    errors = [(i, f) for f, i in before.items() if f.status == "error"] + [(failed, future)]
    i, future = min(errors, key=lambda e: e[0])
    exc = future.exception()
    if isinstance(exc, MinsharpError):
        raise exc.with_traceback(None)
    from distributed.scheduler import KilledWorker

    if isinstance(exc, KilledWorker):
        a, b = ranges[i]
        raise MinsharpError(f"Dask workers died repeatedly while scoring samples {a}..{b - 1} "
                            f"(shard {i}); see the workers' logs") from None
    raise exc
