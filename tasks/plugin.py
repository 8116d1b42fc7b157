"""The built-in task plugin: registers the VQAv2 and COCO-caption tasks like any third-party
plugin (by import path)."""

from __future__ import annotations

from harness.hookspecs import Register, hookimpl
from harness.plugins import register_from


@hookimpl
def register_tasks(register: Register) -> None:
    register_from(register, "tasks.vqav2", [
        ("vqav2", "VQAv2Task", "VQAv2 open-ended questions, official VQA accuracy (data: shapes | VQAv2 folder)")])
    register_from(register, "tasks.coco_captions", [
        ("coco_captions", "CocoCaptionsTask",
         "COCO captioning, CIDEr/BLEU-4/ROUGE-L/METEOR (data: shapes | COCO folder, Karpathy splits)")],
        requires=("pycocoevalcap",))
