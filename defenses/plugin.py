"""Built-in defenses, registered like any third-party plugin."""

from defenses.basic import JpegDefense, NoDefense
from defenses.diffpure import DiffPure
from harness.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    register("none", NoDefense, description="no defense")
    register("jpeg", JpegDefense, description="JPEG re-compression (not differentiable: BPDA identity)")
    register("diffpure", DiffPure, description="DiffPure (Nie et al. 2022): diffuse to t*, reverse (sde/ddpm/ddim); exact gradients, EOT")
