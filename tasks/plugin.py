"""The built-in task plugin: registers the VQAv2 and COCO-caption tasks like any third-party plugin."""

from __future__ import annotations

from harness.hookspecs import Register, hookimpl
from tasks.coco_captions import CocoCaptionsTask
from tasks.vqav2 import VQAv2Task


@hookimpl
def register_tasks(register: Register) -> None:
    register(
        "vqav2",
        VQAv2Task,
        description="VQAv2 open-ended questions, official VQA accuracy (data: shapes | VQAv2 folder)",
    )
    register(
        "coco_captions",
        CocoCaptionsTask,
        description="COCO captioning, CIDEr/BLEU-4/ROUGE-L/METEOR (data: shapes | COCO folder, Karpathy splits)",
    )
