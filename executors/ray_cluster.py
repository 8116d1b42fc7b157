"""``ray``: the work graph on a Ray cluster (Ray core tasks), or on a local Ray of this machine.

Each node becomes one Ray task that reserves the node's resources (``num_cpus`` = its threads,
``num_gpus``, ``memory``), so Ray places it and runs independent nodes at once. Ray reuses
worker processes, and a worker keeps the models it loaded (:func:`harness.runner.component`)
for the next node it runs: a victim loads once per worker, not once per chunk. A worker killed
mid-task is retried by Ray (``max_retries``); only the driver writes the store, and it commits a
node when its one result arrives, so a retry never duplicates a row.

Without ``address`` a local Ray is started with ``num_cpus`` CPUs (default: all) and stopped at
the end (and killed with the driver, however it dies: :func:`harness.lifetime.ensure_descendant_guard`);
with one (``auto``, ``ray://host:10001``, ``host:6379``) the run joins that cluster.
Workers need this project (and any plugin package) installed, and ``$CODEFEND_HOME`` on shared
storage or their own copy of it: see docs/scale.md.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Callable

from pydantic import Field


class RayExecutor:
    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: Annotated[int, Field(ge=1)] | None = None,
        num_gpus: Annotated[int, Field(ge=0)] | None = None,
        max_retries: Annotated[int, Field(ge=0)] = 3,
        runtime_env: dict[str, Any] | None = None,
        include_dashboard: bool | None = None,
    ):
        if address is not None and (num_cpus is not None or num_gpus is not None):
            raise ValueError("ray executor: num_cpus and num_gpus size a local Ray; a cluster (address) has its own")
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("max_retries", max_retries)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"ray executor: {name} must be a non-negative integer, got {value!r}")
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self.include_dashboard = include_dashboard
        self.dashboard_url: str | None = None
        self._started_here = False
        self._remote: dict[Callable[..., Any], Any] = {}
        self._pending: dict[Any, int] = {}
        self._next = 0

    def threads_for(self, resources: Any) -> int | None:
        return int(resources.threads)

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("the ray executor needs Ray: pip install 'codefend-bench[ray]'") from None
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        if self.address is None:
            kwargs.update(num_cpus=self.num_cpus or os.cpu_count(), num_gpus=self.num_gpus)
            if self.include_dashboard is not None:
                kwargs["include_dashboard"] = self.include_dashboard
            self._started_here = True
            # a local Ray's agents and idle workers outlive a SIGKILLed driver by seconds to a
            # minute (they notice their raylet's death late); the guard kills them at once
            from harness.lifetime import ensure_descendant_guard

            ensure_descendant_guard()
        else:
            kwargs["address"] = self.address
        context = ray.init(**kwargs)
        url = getattr(context, "dashboard_url", None)
        self.dashboard_url = f"http://{url}" if url and not str(url).startswith("http") else (url or None)

    def submit(self, fn: Callable[[Any], Any], call: Any, resources: Any) -> int:
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn)
        options: dict[str, Any] = {"num_cpus": resources.threads, "max_retries": self.max_retries,
                                   "retry_exceptions": False}
        if resources.gpus:
            options["num_gpus"] = resources.gpus
        if resources.memory_gb:
            options["memory"] = int(resources.memory_gb * 2**30)
        ref = self._remote[fn].options(**options).remote(call)
        self._next += 1
        self._pending[ref] = self._next
        return self._next

    def wait(self) -> list[tuple[int, Any]]:
        import ray

        done, _ = ray.wait(list(self._pending), num_returns=1)
        return [(self._pending.pop(ref), ray.get(ref)) for ref in done]

    def close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()
            self._started_here = False
        self._pending.clear()
