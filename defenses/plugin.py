"""Built-in defenses, registered like any third-party plugin."""

from defenses.basic import JpegDefense, NoDefense
from harness.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    register("none", NoDefense, description="no defense")
    register("jpeg", JpegDefense, description="JPEG re-compression (not differentiable: BPDA identity)")
