"""Built-in victim models, registered like any third-party plugin (by import path: a module is
imported when its victim is first used)."""

from harness.hookspecs import hookimpl
from harness.plugins import register_from


@hookimpl
def register_victims(register):
    register_from(register, "harness.victims.shapes_vlm", [
        ("shapes-vlm", "ShapesVLM", "offline ViT+GPT-2 image-to-text model trained on the shapes world")])
    register_from(register, "harness.victims.hf", [
        ("hf-image-text-to-text", "HFImageTextToText",
         "any transformers AutoModelForImageTextToText checkpoint with a chat template (local/cached only)"),
        ("hf-llava", "HFLlava", "LLaVA-1.5-style checkpoint, e.g. llava-hf/llava-1.5-7b-hf (local/cached only)"),
        ("hf-blip2", "HFBlip2", "BLIP-2 or InstructBLIP, e.g. Salesforce/blip2-opt-2.7b (local/cached only)"),
    ], requires=("transformers",))
    register_from(register, "harness.victims.hf_blip", [
        ("hf-blip", "HFBlip", "BLIP VQA or captioning, e.g. Salesforce/blip-vqa-base (local/cached only)")],
        requires=("transformers",))
