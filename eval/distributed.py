"""Sweeps on a Dask cluster (the ``distributed`` extra): ``--scheduler ADDRESS`` sends the
points to a running scheduler, ``--scheduler local`` starts a local cluster.

The client writes each row as its future completes (the same durable, resumable file
as a local sweep). The data and trained models are scattered to every worker once; each
task carries only its point. A worker that dies mid-point has its task rerun elsewhere
by the scheduler, and the client still receives exactly one result per point."""
from __future__ import annotations

import os
from typing import Iterator, Optional


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ValueError("--scheduler needs Dask's distributed scheduler: pip install -e '.[distributed]'") from None
    return distributed


def _point_task(ctx, spec, index: int, point: dict, threads: Optional[int]) -> dict:
    """One point on a worker. ``threads``: set only on the local cluster this client
    started, whose workers (named 0, 1, ...) also share the machine's GPUs
    (:func:`~eval.sweep.worker_device`); a cluster's own workers use the GPU they were
    given."""
    from .sweep import evaluate_point, use_worker_device, worker_device

    if threads:
        import dataclasses

        import numba
        import torch

        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        device = worker_device(ctx.device, int(_import_distributed().get_worker().name))
        use_worker_device(device)
        ctx = dataclasses.replace(ctx, device=device)
    return evaluate_point(ctx, spec, index, point)


class DaskRunner:
    """A connection to a Dask scheduler (or a local cluster it starts), made up front so
    that an unreachable scheduler fails within ``timeout`` seconds, before any work."""

    def __init__(self, scheduler: str, workers: int = 1, timeout: float = 10.0) -> None:
        distributed = _import_distributed()
        self.cluster = None
        self.threads = None
        try:
            if scheduler == "local":
                self.cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                        dashboard_address=None)
                self.threads = max(1, (os.cpu_count() or 1) // workers)
                self.client = distributed.Client(self.cluster, timeout=timeout)
            else:
                self.client = distributed.Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as err:
            self.close()
            raise ValueError(f"--scheduler {scheduler}: cannot reach a Dask scheduler within {timeout:g} s "
                             f"({type(err).__name__}: {err}); start one with 'dask scheduler' and "
                             f"'dask worker ADDRESS', or use --scheduler local") from None

    def rows(self, ctx, spec, todo: list) -> Iterator[dict]:
        from distributed import as_completed

        [shared] = self.client.scatter([ctx], broadcast=True)  # data and models, once per worker
        futures = [self.client.submit(_point_task, shared, spec, index, point, self.threads, pure=False,
                                      key=f"xbarsim-point-{index}-{spec.point_seed(point)}-{os.getpid()}")
                   for index, point in todo]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
