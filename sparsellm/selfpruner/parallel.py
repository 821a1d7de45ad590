"""Self-Pruner's fitness on a Ray cluster (issue 22, part 6): the candidates of one generation are independent,
so `evolve(fitness_many=...)` hands them to Ray actors that each keep the dense model, the importance scores
and the fitness token ids loaded, and gathers the perplexities in the candidates' order.

    Cluster(workers=N)           a local Ray cluster started here (ray.init(num_cpus=max(N, cores))), N actors
    Cluster(address="host:port") an existing cluster (`ray start --head`); actors: --workers, else one per GPU
                                 of the cluster, else one per node
    cluster.fitness(model, imp, ids, seqlen, windows, gqa, device) -> fitness_many(list of rate vectors)
    cluster.close()              kills the actors; shuts down a cluster started here

Each actor computes `driver.fitness_of`, the same function the serial search calls, on the same dense model
(sent once through the object store with ray.put, in its dtype, on the same device type), the same importance
and the same token ids: a candidate's fitness is the serial one bit for bit on the same kind of machine
when the actor's torch thread count equals the serial run's, so the search (population, fitness values,
evaluations, history) equals the serial run. With other thread counts the products sum in another order and
the fitness values may differ in their last bits (and a near-tie then selects differently). Checked by
tests/test_ray_search.py and bench/ray_search_bench.py (CPU; a GPU run matches a serial GPU run as far as its
kernels are deterministic).

Resources: a CPU actor reserves `threads` = max(1, CPUs // actors) Ray CPUs and runs torch with that many
threads. When the cluster has GPUs, each actor reserves one (num_gpus=1: one actor per GPU; Ray sets its
CUDA_VISIBLE_DEVICES) and runs the fitness on "cuda"; more actors than GPUs is a UsageError. On an existing
cluster, sparsellm (same version) must be importable on every node.

Errors (UsageError, one line): Ray not installed (the install command is `pip install 'sparsellm[ray]'`),
workers < 1, an address where nothing answers within CONNECT_TIMEOUT seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from ..config import setting
from ..errors import UsageError

log = logging.getLogger("sparsellm")

INSTALL = "pip install 'sparsellm[ray]'"
CONNECT_TIMEOUT = 5.0  # seconds to open a TCP connection to --ray_address before ray.init (which retries for minutes)
FREE_WAIT = 10.0  # seconds to wait for the actors' CPUs / GPUs to be free (a killed actor returns them late)
READY_TIMEOUT = 900.0  # seconds for the actors to load the model (an actor that cannot be placed waits forever)


@dataclass
class Parallel:
    """Where the fitness runs: serially in this process (the default), on `workers` Ray actors of a local
    cluster started for the run, or on an existing cluster at `ray_address`. Not part of a search's resume
    fingerprint: a resumed search may use other workers and continues exactly."""

    workers: int | None = setting(None, "fitness on N Ray worker actors (a local cluster unless --ray_address; "
                                        "needs Ray: pip install 'sparsellm[ray]')", metavar="N")
    ray_address: str | None = setting(None, "fitness on an existing Ray cluster, e.g. 10.0.0.1:6379 (ray start "
                                            "--head); one worker per GPU unless --workers", metavar="ADDR")

    def validate(self) -> "Parallel":
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise UsageError("--ray_address is empty")
        return self

    @property
    def enabled(self) -> bool:
        return self.workers is not None or self.ray_address is not None


def import_ray():
    """The ray module, or a UsageError naming the install command."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--workers / --ray_address need Ray: {INSTALL}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """UsageError unless a TCP connection to `address` ("host:port" or "ray://host:port") opens within
    `timeout` seconds; "auto" and "local" are left to ray.init."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray_address must be host:port (or ray://host:port), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"--ray_address {address}: no Ray cluster answers ({e.strerror or e})") from None


class _Worker:
    """One actor: the dense model (on `dense_device`, as in the driver), the importance and the fitness ids."""

    def __init__(self, model, imp, ids, seqlen: int, windows: int, gqa: str, dense_device: str, device: str | None,
                 threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model = model.to(dense_device)
        self.args = (imp, ids, seqlen, windows, gqa, device)

    def ready(self) -> dict:
        import torch

        from . import driver

        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "module": driver.__file__}

    def score(self, rates) -> float:
        from .driver import fitness_of

        imp, ids, seqlen, windows, gqa, device = self.args
        return fitness_of(self.model, imp, rates, ids, seqlen, windows, gqa, device)


class Cluster:
    """A connection to Ray for one run (see the module doc). A Ray session already open in this process
    (ray.is_initialized(), e.g. a test's) is used as it is and left open by `close`."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        Parallel(workers, address).validate()
        ray = self.ray = import_ray()
        self.actors, self.owned = [], False
        if ray.is_initialized():
            pass
        elif address is None:
            cores = os.cpu_count() or 1
            ray.init(num_cpus=max(workers, cores), include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
            self.owned = True
        else:
            check_reachable(address)
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, TimeoutError, RuntimeError) as e:
                raise UsageError(f"--ray_address {address}: cannot connect ({str(e).splitlines()[0]})") from None
        res = ray.cluster_resources()
        self.cpus, self.gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        self.workers = workers or self.gpus or max(1, nodes)
        if self.gpus and self.workers > self.gpus:
            raise UsageError(f"--workers {self.workers}: the Ray cluster has {self.gpus} GPUs (one worker per GPU)")
        self.threads = max(1, self.cpus // self.workers)
        log.info("Ray: %d fitness workers (%s), %d CPUs and %d GPUs in the cluster%s", self.workers,
                 "one GPU each" if self.gpus else f"{self.threads} threads each", self.cpus, self.gpus,
                 "" if self.owned else f" at {address or ray.get_runtime_context().gcs_address}")

    def fitness(self, model, imp, ids, seqlen: int, windows: int, gqa: str, device=None):
        """Start the actors with the dense `model` (left unchanged here), `imp` and the fitness `ids` (each put in
        the object store once) and return fitness_many(list of rate vectors) -> list of perplexities, in order.
        The model is pickled from the CPU (moved there and back if it lives on a GPU)."""
        import torch

        from ..onload import ATTR

        ray = self.ray
        gpu = self.gpus > 0
        if not gpu and device is not None and torch.device(device).type != "cpu":
            raise UsageError(f"fitness on {device}: the Ray cluster has no GPU")
        fit_device = None if device is None else ("cuda" if gpu else "cpu")
        onloader = model.__dict__.pop(ATTR, None)  # an onloader is this process's; the actors need none
        dense = next((str(p.device) for p in model.parameters()), "cpu")
        try:
            if dense != "cpu":
                model.to("cpu")
            refs = [ray.put(x) for x in (model, imp, ids)]
        finally:
            if dense != "cpu":
                model.to(dense)
            if onloader is not None:
                model.__dict__[ATTR] = onloader
        worker_dense = "cuda" if dense != "cpu" else "cpu"  # an actor's GPU is its "cuda"
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": self.threads}
        self._check_free(opts)
        actor = ray.remote(**opts)(_Worker)
        self.actors = [actor.remote(*refs, seqlen, windows, gqa, worker_dense, fit_device, self.threads)
                       for _ in range(self.workers)]
        try:
            ready = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the {self.workers} Ray workers were not ready after {READY_TIMEOUT:.0f} s: does the "
                               f"cluster have {opts} free for each?") from None
        log.info("Ray workers ready: %s", ", ".join(f"pid {r['pid']} ({r['threads']} threads)" for r in ready))
        from ray.util import ActorPool

        pool = ActorPool(self.actors)

        def fitness_many(vectors):
            return list(pool.map(lambda a, v: a.score.remote(list(v)), vectors))  # in submission order
        return fitness_many

    def _check_free(self, opts: dict, wait: float = FREE_WAIT) -> None:
        """UsageError unless the cluster has the actors' CPUs / GPUs free within `wait` seconds (killed
        actors return theirs with a delay); Ray would otherwise wait for them forever."""
        needs = {"CPU": opts["num_cpus"] * self.workers, "GPU": opts.get("num_gpus", 0) * self.workers}
        deadline = time.monotonic() + wait
        while True:
            free = self.ray.available_resources()
            short = {k: free.get(k, 0) for k, n in needs.items() if n and free.get(k, 0) < n}
            if not short:
                return
            if time.monotonic() > deadline:
                k, have = next(iter(short.items()))
                raise UsageError(f"{self.workers} Ray workers need {needs[k]:g} {k}s; the cluster has {have:g} free "
                                 "(other actors hold the rest)")
            time.sleep(0.2)

    def release(self) -> None:
        """Kill the actors (and with them their copies of the model); the cluster stays."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 (an actor that already died)
                pass
        self.actors = []

    def close(self) -> None:
        """`release`, then shut Ray down if this Cluster started it. Safe to call twice."""
        self.release()
        if self.owned:
            self.ray.shutdown()
            self.owned = False

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
