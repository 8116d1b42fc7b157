"""The built-in executors, registered like any third-party plugin."""

from executors.local import LocalExecutor
from executors.ray_cluster import RayExecutor
from harness.hookspecs import hookimpl


@hookimpl
def register_executors(register):
    register("local", LocalExecutor,
             description="the work graph on this machine: in this process, or a pool of `workers` processes")
    register("ray", RayExecutor,
             description="the work graph as Ray tasks, on a local Ray (default) or a cluster (`address`)")
