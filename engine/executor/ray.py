"""TP x PP workers as Ray actors in one placement group; the driver (the replica) broadcasts each step's batch.

Inside a placement group (a Serve replica's, which reserves a bundle per rank) the workers take its bundles;
elsewhere (offline `LLM`) the executor creates a placement group of its own and removes it at shutdown.

Tensors move over torch.distributed (NCCL on GPU, gloo on CPU); Ray carries only batches, outputs and pings.
Up to `pipeline_parallel_size` steps can be in flight: `execute_async` submits a step to every worker and
returns at once, and each worker runs its steps in submission order, so stage k works on step n while stage
k+1 works on step n-1.

When every worker runs on the driver's node, steps skip Ray: the driver writes batches to a shared-memory ring
that every worker reads, and the rank that reports outputs writes them to a second ring that the driver reads
(engine/executor/shm_channel.py). Each worker's `serve_channel` call lasts as long as its loop, so a failed
worker shows up as that call ending. Under pipeline parallelism the last stage also sends its sampled tokens to
the first (torch.distributed), so the driver can schedule a micro-batch's next step before it has seen them."""
from __future__ import annotations

import itertools
import logging
import os
import time

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.config import EngineConfig
from engine.executor.shm_channel import ShmChannel
from engine.parallel_state import DistributedInitError, balanced_layer_split, layer_ranges
from engine.step import BatchInput, StepOutput
from engine.worker import Worker

logger = logging.getLogger("strata")
WORKER_START_TIMEOUT_S = 300.0  # a fresh worker process imports torch; slow on a busy node, but not this slow
SERVING_CHECK_S = 0.1  # while waiting on a channel, how often to look for a worker whose loop ended


class RayWorker(Worker):
    async def info(self) -> dict:
        return dict(node_id=ray.get_runtime_context().get_node_id(), ip=ray.util.get_node_ip_address(),
                    pid=os.getpid(), gpu_ids=ray.get_gpu_ids())


class RayExecutor:
    """The `Executor` whose step handle is the step's number: steps are numbered in submission order."""

    worker_cls = RayWorker  # tests swap in a worker that misbehaves
    health_timeout_s = 10.0

    def __init__(self, config: EngineConfig, runner_kwargs: dict):
        """`runner_kwargs` are the ModelRunner's arguments (ModelSetup.runner_kwargs), the shards' device among
        them; each worker runs on that device type, at its own index."""
        self.tp, self.pp = config.tensor_parallel_size, config.pipeline_parallel_size
        self.world = self.tp * self.pp
        self.timeout_s = config.distributed_init_timeout_s
        self.workers: list = []
        self.infos: list[dict] = []
        self.pg = None
        self._owns_pg = False
        self.down: str | None = None  # why no step can run any more
        self._seq = itertools.count()
        self.batches = self.outputs = None  # the shared-memory channels, when every worker is on this node
        self._serving: list = []  # the workers' serve_channel calls, while their loops run
        self._results: dict[int, StepOutput | None] = {}  # outputs read ahead of the step waited for
        self._calls: dict[int, list] = {}  # without the channels: each submitted step's Ray calls, one per rank
        self._next_output = 0
        self._next_check = 0.0
        self._owns_ray = _ensure_ray(self.world)
        try:
            self._start(config, runner_kwargs)
        except BaseException:
            self.shutdown()
            raise

    @property
    def is_dead(self) -> bool:
        return self.down is not None

    # -- start ----------------------------------------------------------------------------------------------
    def _start(self, config: EngineConfig, runner_kwargs: dict) -> None:
        hf_config = runner_kwargs["hf_config"]
        split = config.pipeline_layer_split or balanced_layer_split(hf_config, self.pp)
        self.layer_ranges = ranges = layer_ranges(hf_config.num_hidden_layers, self.pp, split)
        device = runner_kwargs["device"].type
        bundle = self._placement_group(device, config.placement_strategy)
        remote = ray.remote(self.worker_cls)
        # Each GPU worker sees all of its node's GPUs and picks its own by the id Ray assigned: the symmetric-memory
        # all-reduce needs ranks on distinct device indices (with one visible GPU each, every rank is cuda:0).
        env = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}} if device == "cuda" else None
        actors = [remote.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), runtime_env=env,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(
                                     self.pg, placement_group_bundle_index=i)).remote()
                  for i in range(self.world)]
        self.workers = actors  # shut down even if the next line fails
        infos = self._get([a.info.remote() for a in actors], "start", WORKER_START_TIMEOUT_S)
        # Keep each node's workers on consecutive ranks, so TP groups stay inside a node when they can.
        driver_ip = ray.util.get_node_ip_address()
        order = sorted(range(self.world), key=lambda i: (infos[i]["ip"] != driver_ip, infos[i]["node_id"],
                                                         infos[i]["gpu_ids"]))
        self.workers, self.infos = [actors[i] for i in order], [infos[i] for i in order]
        addr = self.infos[0]["ip"]
        port = self._get([self.workers[0].open_store.remote(self.world, self.timeout_s)], "open a store",
                         self.timeout_s)[0]
        self._join(addr, port, device)
        self._get([w.load.remote(runner_kwargs, ranges[r // self.tp]) for r, w in enumerate(self.workers)], "load")
        here = ray.get_runtime_context().get_node_id()
        if all(i["node_id"] == here for i in self.infos):
            self.batches = ShmChannel.create(self.world)
            self.outputs = ShmChannel.create(1, reader=0)
        logger.info("%d workers (tp %d x pp %d) on %s, layers %s, steps through %s", self.world, self.tp, self.pp,
                    sorted({i["node_id"][:8] for i in self.infos}), ranges,
                    "shared memory" if self.batches else "Ray calls")

    def _placement_group(self, device: str, strategy: str) -> dict:
        """Take bundles 0..world-1 of the placement group this process runs in (a Serve replica reserves one
        bundle per rank, see cluster/app.py: a GPU each on GPU nodes, a CPU each otherwise, the replica's own CPUs
        in bundle 0), or else create one. Returns the resources each worker asks of its bundle."""
        current = ray.util.get_current_placement_group()
        shared = {"GPU": 1} if device == "cuda" else {"CPU": 1}
        if current is not None and _bundles_fit(current.bundle_specs[:self.world], shared, self.world):
            self.pg, self._owns_pg = current, False
            return shared
        bundle = {"CPU": 1, "GPU": 1} if device == "cuda" else {"CPU": 1}
        self.pg, self._owns_pg = placement_group([bundle] * self.world, strategy=strategy), True
        if not ray.wait([self.pg.ready()], timeout=self.timeout_s)[0]:
            raise RuntimeError(f"no room for {self.world} workers of {bundle} ({strategy}) within {self.timeout_s:g} s;"
                               f" the cluster has {ray.available_resources()} free")
        return bundle

    def _join(self, addr: str, port: int, device: str) -> None:
        refs = [w.init_distributed.remote(r, self.world, self.tp, addr, port, self.timeout_s, device, i["ip"],
                                          int(i["gpu_ids"][0]) if device == "cuda" and i["gpu_ids"] else 0)
                for r, (w, i) in enumerate(zip(self.workers, self.infos))]
        missing, pending, deadline = set(), list(refs), time.monotonic() + self.timeout_s + 10
        while pending and not missing:
            ready, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # these ranks did not even report back
                missing = {refs.index(p) for p in pending}
            for ref in ready:
                try:
                    missing.update(ray.get(ref))
                except RayError as e:
                    r = refs.index(ref)
                    raise RuntimeError(f"rank {r} ({self._where(r)}) failed to join the process group: {e}") from e
        if missing:
            names = ", ".join(f"rank {r} ({self._where(r)})" for r in sorted(missing))
            raise DistributedInitError(f"{names} did not join the process group at tcp://{addr}:{port} within "
                                       f"{self.timeout_s:g} s (distributed_init_timeout_s)", sorted(missing))

    def _where(self, rank: int) -> str:
        if rank >= len(self.infos):
            return f"placement group bundle {rank}"
        i = self.infos[rank]
        return f"node {i['node_id'][:12]}, {i['ip']}, pid {i['pid']}"

    def _get(self, refs: list, what: str = "run a step", timeout: float | None = None) -> list:
        """ray.get of one call per rank that names the rank that failed or did not answer, and marks the executor
        dead: a worker that failed once leaves its peers out of step."""
        pending, results = list(refs), {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, timeout=None if deadline is None else
                                      max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = ", ".join(f"rank {refs.index(p)} ({self._where(refs.index(p))})" for p in pending)
                self.down = f"{ranks} did not {what} within {timeout:g} s"
                raise RuntimeError(self.down)
            for ref in ready:
                rank = refs.index(ref)
                try:
                    results[rank] = ray.get(ref)
                except RayError as e:
                    self.down = f"rank {rank} ({self._where(rank)}) failed to {what}: {e}"
                    raise RuntimeError(self.down) from e
        return [results[r] for r in range(len(refs))]

    def worker_nodes(self) -> list[dict]:
        """Where each rank runs: rank, stage, tp_rank, node_id, ip, pid, gpu_ids."""
        return [dict(rank=r, stage=r // self.tp, tp_rank=r % self.tp, **i) for r, i in enumerate(self.infos)]

    # -- executor interface ---------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Rank 0's kernels, CUDA graphs, device and dtype."""
        return self._call(self.workers[:1], "describe itself", "describe")[0]

    def kv_block_bytes(self) -> int:
        return max(self._call(self.workers, "report its KV block size", "kv_block_bytes"))

    def profile(self, num_tokens: int, gpu_memory_utilization: float) -> list[int | None]:
        return self._call(self.workers, "profile", "profile", num_tokens, gpu_memory_utilization)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call(self.workers, "allocate its KV cache", "allocate_kv_cache", num_blocks)

    def start_profile(self, out_dir: str) -> None:
        """torch.profiler on every rank until stop_profile (out_dir on each rank's own node)."""
        self._call(self.workers, "start profiling", "start_profile", out_dir)

    def stop_profile(self) -> list[str]:
        return self._call(self.workers, "stop profiling", "stop_profile")

    def _call(self, workers: list, what: str, method: str, *args) -> list:
        """A ModelRunner method on each of `workers`, through Ray: the channel loops hold the workers' threads,
        so they stop first (after the steps already sent) and start again with the next step."""
        self._stop_serving()
        return self._get([w.call.remote(method, *args) for w in workers], what)

    def execute_async(self, batch: BatchInput) -> int:
        """Submit one step to every worker; returns its number, the handle for `wait`. Steps run in submission
        order."""
        if self.down:
            raise RuntimeError(f"executor is down: {self.down}")
        seq = next(self._seq)
        if self.batches is None:
            ref = ray.put(batch)
            self._calls[seq] = [w.execute.remote(seq, ref) for w in self.workers]
            return seq
        if not self._serving:
            self._serving = [w.serve_channel.remote(self.batches.name, r,
                                                    self.outputs.name if r == self._output_rank else None)
                             for r, w in enumerate(self.workers)]
        # Read outputs while the ring is full: the output rank may be waiting for room to write one.
        self._through(self.batches.write, batch, should_stop=self._drain_outputs_then_check)
        return seq

    @property
    def samples_later(self) -> bool:
        return False  # the workers sample as they launch: constrained rows never decode ahead here

    def sample(self, handle: int, token_bitmask) -> None:
        raise NotImplementedError("Ray workers take a step's bitmask with the step")

    def wait(self, handle: int) -> StepOutput:
        if self.batches is None:
            return self._get(self._calls.pop(handle))[self._output_rank] or StepOutput()
        if self.down:
            raise RuntimeError(f"executor is down: {self.down}")
        while handle not in self._results:
            self._read_output()
        return self._results.pop(handle) or StepOutput()

    @property
    def _output_rank(self) -> int:
        return (self.pp - 1) * self.tp

    def _read_output(self) -> None:
        self._results[self._next_output] = self._through(self.outputs.read, should_stop=self._loop_ended)
        self._next_output += 1

    def _drain_outputs_then_check(self) -> bool:
        """Read the outputs already written (making room for the output rank), then `_loop_ended`."""
        while self.outputs.ready():
            self._read_output()
        return self._loop_ended()

    def _loop_ended(self) -> bool:
        """Whether a worker's channel loop has ended (it failed, or its process died); looks every SERVING_CHECK_S."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + SERVING_CHECK_S
        return bool(ray.wait(self._serving, timeout=0)[0])

    def _through(self, op, *args, should_stop):
        """A channel read or write that names the rank that failed or did not keep up, and marks the executor dead
        as `_get` does."""
        try:
            return op(*args, timeout=self.timeout_s, should_stop=should_stop)
        except TimeoutError as e:
            rank = self._output_rank
            self.down = f"rank {rank} ({self._where(rank)}) did not run a step within {self.timeout_s:g} s"
            raise RuntimeError(self.down) from e
        except InterruptedError as e:
            rank, error = self._loop_failure()
            self.down = f"rank {rank} ({self._where(rank)}) failed to run a step: {error}"
            raise RuntimeError(self.down) from e

    def _loop_failure(self) -> tuple[int, str]:
        """The rank whose channel loop ended, and why; a rank that died rather than its peers that lost it."""
        failures = []
        for rank, ref in enumerate(self._serving):
            if ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                    failures.append((1, rank, "its step loop stopped"))
                except RayActorError as error:
                    failures.append((0, rank, str(error)))
                except RayError as error:
                    failures.append((1, rank, str(error)))
        return min(failures)[1:]

    def _stop_serving(self) -> None:
        if self._serving:
            self._through(self.batches.write, None, should_stop=self._loop_ended)
            self._get(self._serving, "stop its step loop", self.timeout_s)
            self._serving = []

    def execute(self, batch: BatchInput) -> StepOutput:
        return self.wait(self.execute_async(batch))

    def discard(self, handle: int) -> None:
        """Wait for a step whose output is dropped (an earlier one failed); its own failure is not reported."""
        if self.batches is None:
            calls = self._calls.pop(handle)
            ray.wait(calls, num_returns=len(calls), timeout=self.timeout_s)
            return
        try:
            self.wait(handle)
        except RuntimeError:
            pass

    def check_health(self) -> None:
        """Raise, naming the rank, when a worker died, does not answer within `health_timeout_s`, or is stuck in
        one step longer than the distributed timeout (its collectives would have failed by then)."""
        if self.down:
            raise RuntimeError(f"executor is down: {self.down}")
        refs = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.health_timeout_s)
        for rank, ref in enumerate(refs):
            problem = None
            if ref not in ready:
                problem = f"did not answer a ping within {self.health_timeout_s:g} s"
            else:
                try:
                    busy = ray.get(ref)
                    if busy > self.timeout_s:
                        problem = f"has been stuck in one step for {busy:.0f} s"
                except RayError as e:
                    problem = f"died: {type(e).__name__}"
            if problem:
                self.down = f"rank {rank} ({self._where(rank)}) {problem}"
                raise RuntimeError(f"executor is down: {self.down}")

    def shutdown(self) -> None:
        """Stop the workers, and remove the placement group (and the Ray instance) this executor made. Safe to
        call twice, and at interpreter exit after Ray has shut itself down (the workers went with it)."""
        ray_up = ray.is_initialized()
        if self._serving and not self.down and ray_up:  # let the loops end before their processes do
            try:
                self.batches.write(None, timeout=1.0)
                ray.wait(self._serving, num_returns=len(self._serving), timeout=1.0)
            except TimeoutError:
                pass
        self.down = self.down or "shut down"
        self._serving, self._calls = [], {}
        for channel in (self.batches, self.outputs):
            if channel is not None:
                channel.close()
        for w in self.workers if ray_up else ():
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        if self.pg is not None and self._owns_pg and ray_up:
            remove_placement_group(self.pg)
        self.pg = None
        if self._owns_ray and ray_up:
            ray.shutdown()
        self._owns_ray = False


def _ensure_ray(world: int) -> bool:
    """Connect to the running Ray instance, or start a local one (offline LLM); True when we started it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        # Ray's CPUs are logical here: one per CPU worker even on a smaller machine.
        ray.init(num_cpus=max(os.cpu_count() or 1, world), include_dashboard=False)
        return True


def _bundles_fit(bundles: list[dict], need: dict, world: int) -> bool:
    return len(bundles) == world and all(b.get(k, 0) >= v for b in bundles for k, v in need.items())
