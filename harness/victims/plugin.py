"""Built-in victim models, registered like any third-party plugin."""

from harness.hookspecs import hookimpl
from harness.victims.hf import HFBlip2, HFImageTextToText, HFLlava
from harness.victims.hf_blip import HFBlip
from harness.victims.shapes_vlm import ShapesVLM


@hookimpl
def register_victims(register):
    register("shapes-vlm", ShapesVLM, description="offline ViT+GPT-2 image-to-text model trained on the shapes world")
    register("hf-image-text-to-text", HFImageTextToText,
             description="any transformers AutoModelForImageTextToText checkpoint with a chat template (local/cached only)")
    register("hf-llava", HFLlava, description="LLaVA-1.5-style checkpoint, e.g. llava-hf/llava-1.5-7b-hf (local/cached only)")
    register("hf-blip2", HFBlip2, description="BLIP-2 or InstructBLIP, e.g. Salesforce/blip2-opt-2.7b (local/cached only)")
    register("hf-blip", HFBlip, description="BLIP VQA or captioning, e.g. Salesforce/blip-vqa-base (local/cached only)")
