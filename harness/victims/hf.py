"""Hugging Face multimodal LLMs as victims: any ``AutoModelForImageTextToText`` checkpoint whose
processor has a chat template (LLaVA-1.5, LLaVA-NeXT-style, Qwen-VL-style, ...), loaded by name
through transformers, never downloaded at run time.

The victim contract, for a real MLLM:

- ``prepare`` does the processor's geometric steps outside the graph: resize the shortest edge to
  the processor's size (bicubic) and centre-crop to its crop size. The ε ball lives on these
  [0,1] pixels (``preprocessing`` records the steps).
- Normalisation (the processor's mean/std) runs inside the graph, in the model's dtype.
- One prompt template for ``loss`` and ``generate``: the task prompt put into the victim's
  per-task template (``vqa_template``, ``caption_template``; ``{prompt}`` is the task's text),
  then the processor's chat template with one image and that text as the user turn, and the
  generation prompt appended. ``loss`` appends the target and the end-of-sequence token and counts
  only those tokens. Each row records the text its victim was sent (``record.victim.prompt``).
- Published defaults: ``hf-llava`` asks VQA questions as LLaVA-1.5's own VQAv2 evaluation does
  (``llava/eval/model_vqa_loader.py`` with ``answer_prompt``: "Answer the question using a single
  word or phrase.", also RobustVLM's), and captions with the task's prompt, RobustVLM's "Provide a
  short caption for this image."; ``hf-blip2`` uses the BLIP-2 paper's zero-shot VQA prompt
  "Question: {} Short answer:" and the empty prompt for captions (BLIP-2 captions from the image
  alone). The generic adapter passes the task prompt as it is unless a template is given.
- Greedy decoding (``do_sample=False``, one beam).
- ``trust_remote_code`` is off unless the suite turns it on.

``hf-llava`` is the same adapter, checked to be a LLaVA checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from harness.contracts import TaskKind
from harness.objectives import cross_entropy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_layers(model: torch.nn.Module) -> int:
    """Put each transformer layer of ``model`` under ``torch.utils.checkpoint`` whenever gradients
    are on, and return how many layers that is.

    An attack's backward pass then keeps one layer's activations at a time instead of every
    layer's: a 7B victim's attack memory no longer grows with its depth. transformers' own
    ``gradient_checkpointing_enable`` only checkpoints in train mode, and train mode turns on the
    models' dropout (OPT's, BLIP's); here the model stays in eval mode, so the recomputation on the
    backward pass is exact and the gradients are the unchecked ones. Callers pass
    ``use_cache=False``: a recomputed layer must not append to a KV cache a second time.
    """
    import functools

    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        forward = layer.forward

        @functools.wraps(forward)
        def checkpointed(*args: Any, _forward=forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed
    return len(layers)


def checkpointing_setting(value: object) -> bool | None:
    """The ``gradient_checkpointing`` victim parameter, checked: true, false or None (auto)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"gradient_checkpointing must be true, false or null (auto), got {value!r}")
    return value


def wants_checkpointing(setting: bool | None, device: str, device_map: str | None) -> bool:
    """The ``gradient_checkpointing`` victim parameter: None (the default) turns it on where the
    model sits on a GPU, where attack memory is the limit, and off on the CPU, where it only costs
    a second forward pass per layer."""
    if setting is not None:
        return setting
    return device_map is not None or device.startswith("cuda")


def _missing(model_id: str, cause: BaseException) -> FileNotFoundError:
    from huggingface_hub.constants import HF_HUB_CACHE

    path = Path(model_id).expanduser()
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return FileNotFoundError(
        f"model {model_id!r} not found: looked for a local folder {path.resolve()} with config.json, the "
        f"weights and the processor files, and for the model id in the Hugging Face cache {HF_HUB_CACHE} "
        f"(nothing is downloaded at run time). Download it once with `huggingface-cli download {model_id}` "
        f"or set model_id to a folder ({type(cause).__name__}: {first})"
    )


def resize_and_crop(images: Sequence[np.ndarray], input_size: tuple[int, int], *, shortest_edge: int | None = None) -> torch.Tensor:
    """uint8 HxWx3 images -> float [B,3,H,W] in [0,1] at ``input_size``, outside the graph: resize
    the shortest edge to ``shortest_edge`` and centre-crop (CLIP-style processors), or resize
    straight to ``input_size`` (BLIP-style); bicubic, as the processors do."""
    from PIL import Image

    height, width = input_size
    out = []
    for image in images:
        pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        if shortest_edge is not None:
            scale = shortest_edge / min(pil.size)
            pil = pil.resize((max(shortest_edge, round(pil.width * scale)), max(shortest_edge, round(pil.height * scale))),
                             Image.BICUBIC)
            left, top = (pil.width - width) // 2, (pil.height - height) // 2
            pil = pil.crop((left, top, left + width, top + height))
        elif pil.size != (width, height):
            pil = pil.resize((width, height), Image.BICUBIC)
        out.append(np.asarray(pil, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def normalise(pixels: torch.Tensor, image_processor: Any, dtype: str) -> torch.Tensor:
    """The processor's mean/std normalisation, in the graph, cast to the model's dtype."""
    mean = torch.tensor(image_processor.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return ((pixels - mean) / std).to(DTYPES[dtype])


class HFImageTextToText:
    """``hf-image-text-to-text``: see the module docstring."""

    name = "hf-image-text-to-text"
    expected_model_types: tuple[str, ...] = ()
    requires_chat_template = True
    #: the templates used when the suite sets none (a class's published defaults)
    default_templates: dict[str, str] = {"vqa": "{prompt}", "caption": "{prompt}"}

    def __init__(
        self,
        *,
        model_id: str,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        device: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 32,
        vqa_template: str | None = None,
        caption_template: str | None = None,
        max_new_tokens_by_task: dict[str, int] | None = None,
        gradient_checkpointing: bool | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.templates = {
            "vqa": self.default_templates["vqa"] if vqa_template is None else vqa_template,
            "caption": self.default_templates["caption"] if caption_template is None else caption_template,
        }
        if "{prompt}" not in self.templates["vqa"]:
            raise ValueError(f"vqa_template must contain {{prompt}} (where the question goes), got {self.templates['vqa']!r}")
        by_task = dict(max_new_tokens_by_task or {})
        unknown = sorted(set(by_task) - {"vqa", "caption"})
        if unknown or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in by_task.values()):
            raise ValueError("max_new_tokens_by_task maps a task kind (vqa, caption) to an integer >= 1, "
                             f"e.g. {{vqa: 10, caption: 40}}; got {max_new_tokens_by_task!r}")
        self.max_new_tokens_by_task = by_task
        self.model_id = model_id
        self.dtype = dtype
        self._device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device_map = device_map
        self.trust_remote_code = trust_remote_code
        self.max_new_tokens = max_new_tokens
        self.gradient_checkpointing = checkpointing_setting(gradient_checkpointing)
        #: transformer layers under checkpointing once loaded (0: off)
        self.checkpointed_layers = 0
        self.input_size = (0, 0)
        self.preprocessing = ""
        self._model: Any = None
        self._processor: Any = None
        self._fingerprint: str | None = None

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = {"local_files_only": True, "trust_remote_code": self.trust_remote_code}
        try:
            processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
            model = AutoModelForImageTextToText.from_pretrained(
                self.model_id, dtype=DTYPES[self.dtype], device_map=self.device_map, **kwargs
            )
        except (OSError, ValueError) as exc:
            if "trust_remote_code" in str(exc):
                raise ValueError(
                    f"{self.model_id!r} needs custom code from its repository; it runs only with "
                    "trust_remote_code: true in the victim's params (review that code first)"
                ) from exc
            raise _missing(self.model_id, exc) from exc
        model_type = getattr(model.config, "model_type", "?")
        if self.expected_model_types and model_type not in self.expected_model_types:
            raise ValueError(
                f"{self.name} expects a {' or '.join(self.expected_model_types)} checkpoint; {self.model_id!r} is "
                f"{model_type!r}: use hf-image-text-to-text for it"
            )
        if self.requires_chat_template and getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{self.model_id!r} has no chat template in its processor: the prompt template is undefined")
        if self.device_map is None:
            model.to(self._device_name)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        if wants_checkpointing(self.gradient_checkpointing, self._device_name, self.device_map):
            self.checkpointed_layers = checkpoint_layers(model)
        self._model, self._processor = model, processor
        self.input_size, self.preprocessing = self._geometry()

    def _geometry(self) -> tuple[tuple[int, int], str]:
        ip = self._processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        if "height" in crop:
            out = (int(crop["height"]), int(crop["width"]))
        elif "height" in size:
            out = (int(size["height"]), int(size["width"]))
        else:
            edge = int(size.get("shortest_edge", 224))
            out = (edge, edge)
        if "shortest_edge" in size:
            how = f"resize shortest edge to {size['shortest_edge']} (bicubic), centre-crop {out[0]}x{out[1]}"
        else:
            how = f"resize to {out[0]}x{out[1]} (bicubic)"
        return out, how

    @property
    def device(self) -> torch.device:
        self.load()
        return next(self._model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """Model id, its config and the names and sizes of its weight files (hashing 14 GB of
        weights per run would cost minutes; a changed checkpoint changes its files' sizes or
        config, and a Hugging Face snapshot folder names its commit)."""
        if self._fingerprint is None:
            self.load()
            from huggingface_hub import snapshot_download

            try:
                folder = Path(self.model_id) if Path(self.model_id).is_dir() else Path(
                    snapshot_download(self.model_id, local_files_only=True))
            except Exception:  # noqa: BLE001 - a folder we cannot list still has a config
                folder = None
            files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder else []
            blob = json.dumps({"id": self.model_id, "folder": folder.name if folder else None,
                               "config": self._model.config.to_dict(), "files": files, "dtype": self.dtype,
                               # what it is asked and how long it may answer change every output
                               "templates": self.templates, "max_new_tokens": self.max_new_tokens,
                               "max_new_tokens_by_task": self.max_new_tokens_by_task},
                              sort_keys=True, default=str)
            self._fingerprint = f"{self.name}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        return self._fingerprint

    # -- the victim contract -----------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        self.load()
        size = getattr(self._processor.image_processor, "size", None) or {}
        edge = int(size["shortest_edge"]) if "shortest_edge" in size else None
        return resize_and_crop(images, self.input_size, shortest_edge=edge)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise(pixels, self._processor.image_processor, self.dtype)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, T, D] image features from the model's ``get_image_features``: the projected tokens
        the language model reads where the model returns them as ``pooler_output`` (LLaVA, BLIP-2),
        else the vision tower's last hidden state."""
        self.load()
        out = self._model.get_image_features(pixel_values=self._normalise(pixels))
        if isinstance(out, torch.Tensor):
            features = out
        elif isinstance(out, (list, tuple)):
            features = torch.stack(list(out)) if isinstance(out[0], torch.Tensor) else out[0]
        else:
            features = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
        if isinstance(features, (list, tuple)):  # LLaVA: one [tokens, D] tensor of projected features per image
            features = torch.stack(list(features))
        return features.float() if features.dim() == 3 else features.float().unsqueeze(1)

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mean-pooled :meth:`image_features` (for transfer attacks such as mf-ii)."""
        return self.image_features(pixels).mean(dim=1)

    def templated(self, prompt: str, kind: TaskKind = "vqa") -> str:
        """The task prompt in this victim's template for the task kind."""
        return self.templates[kind].replace("{prompt}", prompt)

    def prompt_text(self, prompt: str, kind: TaskKind = "vqa") -> str:
        """The one template of ``loss`` and ``generate``: the chat template, one image, the task
        prompt in its per-task template."""
        self.load()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.templated(prompt, kind)}]}]
        return self._processor.apply_chat_template(messages, add_generation_prompt=True)

    def max_new_tokens_for(self, kind: TaskKind) -> int:
        return self.max_new_tokens_by_task.get(kind, self.max_new_tokens)

    def prompt_inputs(self, prompts: Sequence[str], kind: TaskKind = "vqa") -> list[dict[str, list[int]]]:
        """Every token-id input the processor makes for each prompt: ``input_ids`` with the image
        placeholder expanded as the processor does (a blank image of the input size stands in: the
        expansion depends on the size only), plus side inputs such as InstructBLIP's
        ``qformer_input_ids``."""
        blank = np.zeros((*self.input_size, 3), dtype=np.uint8)
        out = []
        for prompt in prompts:
            encoded = self._processor(images=[blank], text=[self.prompt_text(prompt, kind)], return_tensors="pt")
            out.append({key: value[0].tolist() for key, value in encoded.items() if key.endswith("input_ids")})
        return out

    def prompt_ids(self, prompts: Sequence[str], kind: TaskKind = "vqa") -> list[list[int]]:
        """The language model's prompt token ids (see :meth:`prompt_inputs`)."""
        return [inputs["input_ids"] for inputs in self.prompt_inputs(prompts, kind)]

    @staticmethod
    def _side_inputs(inputs: list[dict[str, list[int]]], device: torch.device) -> dict[str, torch.Tensor]:
        """The side token inputs (InstructBLIP's Q-Former instruction), right-padded, with masks."""
        extra: dict[str, torch.Tensor] = {}
        for key in inputs[0]:
            if key == "input_ids":
                continue
            width = max(len(i[key]) for i in inputs)
            ids = torch.zeros((len(inputs), width), dtype=torch.long)
            mask = torch.zeros((len(inputs), width), dtype=torch.long)
            for row, item in enumerate(inputs):
                ids[row, : len(item[key])] = torch.tensor(item[key])
                mask[row, : len(item[key])] = 1
            extra[key] = ids.to(device)
            extra[key[: -len("input_ids")] + "attention_mask"] = mask.to(device)
        return extra

    def _target_ids(self, target: str) -> list[int]:
        tokenizer = self._processor.tokenizer
        return tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind = "vqa") -> torch.Tensor:
        return cross_entropy(*self.target_logits(pixels, prompts, targets, kind))

    def target_logits(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
                      kind: TaskKind = "vqa") -> tuple[torch.Tensor, torch.Tensor]:
        self.load()
        inputs = self.prompt_inputs(prompts, kind)
        prefixes = [i["input_ids"] for i in inputs]
        sequences = [p + self._target_ids(t) for p, t in zip(prefixes, targets)]
        width = max(len(s) for s in sequences)
        pad = self._processor.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        device = pixels.device
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), -100, dtype=torch.long)
        for row, (prefix, sequence) in enumerate(zip(prefixes, sequences)):
            start = width - len(sequence)  # left padding, as in generate
            input_ids[row, start:] = torch.tensor(sequence)
            attention[row, start:] = 1
            labels[row, start + len(prefix):] = torch.tensor(sequence[len(prefix):])
        logits = self._model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), pixel_values=self._normalise(pixels),
            use_cache=False, **self._side_inputs(inputs, device),
        ).logits.float()
        # position j predicts token j + 1
        return logits[:, :-1], labels[:, 1:].to(device)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind = "vqa") -> list[str]:
        self.load()
        inputs = self.prompt_inputs(prompts, kind)
        prefixes = [i["input_ids"] for i in inputs]
        width = max(len(p) for p in prefixes)
        tokenizer = self._processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            input_ids[row, width - len(prefix):] = torch.tensor(prefix)
            attention[row, width - len(prefix):] = 1
        generated = self._model.generate(
            input_ids=input_ids.to(pixels.device), attention_mask=attention.to(pixels.device),
            pixel_values=self._normalise(pixels), do_sample=False, num_beams=1,
            max_new_tokens=self.max_new_tokens_for(kind), pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            **self._side_inputs(inputs, pixels.device),
        )
        return [text.strip() for text in tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)]


class HFLlava(HFImageTextToText):
    """``hf-llava``: a LLaVA-1.5-style checkpoint (``llava-hf/llava-1.5-7b-hf``)."""

    name = "hf-llava"
    expected_model_types = ("llava",)
    # LLaVA-1.5's VQAv2 prompt (its eval scripts' answer_prompt; RobustVLM's too); captions take the
    # task's prompt, RobustVLM's "Provide a short caption for this image."
    default_templates = {"vqa": "{prompt}\nAnswer the question using a single word or phrase.", "caption": "{prompt}"}


class HFBlip2(HFImageTextToText):
    """``hf-blip2``: BLIP-2 (``Salesforce/blip2-opt-2.7b``) and InstructBLIP
    (``Salesforce/instructblip-vicuna-7b``). Neither has a chat template: VQA prompts follow the
    BLIP-2 paper's zero-shot VQA prompt ``Question: {prompt} Short answer:`` (``vqa_template``)
    and captioning uses ``caption_template`` (empty by default: BLIP-2 captions from the image
    alone). The processor prepends the query-token placeholders; InstructBLIP's Q-Former also
    reads the prompt (``qformer_input_ids``), in ``loss`` and ``generate`` alike."""

    name = "hf-blip2"
    expected_model_types = ("blip-2", "instructblip")
    requires_chat_template = False
    default_templates = {"vqa": "Question: {prompt} Short answer:", "caption": ""}

    def prompt_text(self, prompt: str, kind: TaskKind = "vqa") -> str:
        return self.templated(prompt, kind)
