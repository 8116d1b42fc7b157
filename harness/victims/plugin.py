"""Built-in victim models, registered like any third-party plugin."""

from harness.hookspecs import hookimpl
from harness.victims.shapes_vlm import ShapesVLM


@hookimpl
def register_victims(register):
    register("shapes-vlm", ShapesVLM, description="offline ViT+GPT-2 image-to-text model trained on the shapes world")
