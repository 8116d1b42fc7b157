"""The built-in executors, registered like any third-party plugin (by import path)."""

from harness.hookspecs import hookimpl
from harness.plugins import register_from


@hookimpl
def register_executors(register):
    register_from(register, "executors.local", [
        ("local", "LocalExecutor",
         "the work graph on this machine: in this process, or a pool of `workers` processes")])
    # registered without Ray installed: using it says how to install the extra
    register_from(register, "executors.ray_cluster", [
        ("ray", "RayExecutor", "the work graph as Ray tasks, on a local Ray (default) or a cluster (`address`)")])
