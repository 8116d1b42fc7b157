"""``hf-blip``: BLIP (Li et al. 2022) checkpoints as victims: the VQA model
(``Salesforce/blip-vqa-base``: ``BlipForQuestionAnswering``) for VQA tasks and the captioning model
(``Salesforce/blip-image-captioning-base``: ``BlipForConditionalGeneration``) for captioning.

BLIP is an encoder-decoder, not a chat model, so its one template is built here from its parts,
identically for ``loss`` and ``generate``:

- VQA: the question ``[CLS] question [SEP]`` goes through the image-grounded text encoder; the
  answer decoder starts from ``decoder_start_token_id`` and ends at ``[SEP]``. ``loss`` scores the
  answer tokens and ``[SEP]``.
- Captioning: the decoder reads ``[BOS] caption_prompt`` ("a picture of", as BLIP's own
  captioning prompt) and continues; ``loss`` scores the caption tokens and ``[SEP]``, and
  ``generate`` returns the continuation without the prompt.

Resize to the image processor's size outside the graph (bicubic); normalise inside it; greedy
decoding. The question padding mask is used in both paths: the library's own ``generate`` ignores
it, which makes a question's answer depend on the longest question in its batch.
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
from harness.victims.hf import (DTYPES, _missing, checkpoint_layers, checkpointing_setting, normalise, resize_and_crop,
                               wants_checkpointing)


class HFBlip:
    name = "hf-blip"

    def __init__(
        self,
        *,
        model_id: str,
        caption_prompt: str = "a picture of",
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        device: str | None = None,
        device_map: str | None = None,
        max_new_tokens: int = 20,
        gradient_checkpointing: bool | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model_id, self.caption_prompt, self.dtype = model_id, caption_prompt, dtype
        self._device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens = max_new_tokens
        # accelerate's placement ("auto" spreads a large model over the visible GPUs); None: all of it on ``device``
        self.device_map = device_map
        # as hf-image-text-to-text's (checkpoint_layers): None is on for a GPU, off on the CPU
        self.gradient_checkpointing = checkpointing_setting(gradient_checkpointing)
        self.checkpointed_layers = 0
        self.input_size = (0, 0)
        self.preprocessing = ""
        self.head: str = ""
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_processor: Any = None
        self._fingerprint: str | None = None

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, BlipForConditionalGeneration, BlipForQuestionAnswering

        try:
            config = AutoConfig.from_pretrained(self.model_id, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(self.model_id, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(self.model_id, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise _missing(self.model_id, exc) from exc
        if config.model_type != "blip":
            raise ValueError(f"hf-blip expects a BLIP checkpoint; {self.model_id!r} is {config.model_type!r}")
        architecture = (config.architectures or ["BlipForConditionalGeneration"])[0]
        cls = BlipForQuestionAnswering if "QuestionAnswering" in architecture else BlipForConditionalGeneration
        self.head = "vqa" if cls is BlipForQuestionAnswering else "caption"
        model = cls.from_pretrained(self.model_id, local_files_only=True, dtype=DTYPES[self.dtype],
                                    device_map=self.device_map)
        if self.device_map is None:
            model.to(self._device_name)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if wants_checkpointing(self.gradient_checkpointing, self._device_name, self.device_map):
            self.checkpointed_layers = checkpoint_layers(model)
        self._model, self._tokenizer, self._image_processor = model, tokenizer, image_processor
        size = image_processor.size
        self.input_size = (int(size["height"]), int(size["width"]))
        self.preprocessing = f"resize to {self.input_size[0]}x{self.input_size[1]} (bicubic)"

    @property
    def device(self) -> torch.device:
        self.load()
        return next(self._model.parameters()).device

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self.load()
            folder = Path(self.model_id)
            files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
            blob = json.dumps({"id": self.model_id, "config": self._model.config.to_dict(), "files": files,
                               "dtype": self.dtype, "caption_prompt": self.caption_prompt}, sort_keys=True, default=str)
            self._fingerprint = f"hf-blip:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        return self._fingerprint

    def _check_kind(self, kind: TaskKind) -> None:
        if kind != self.head:
            other = "Salesforce/blip-vqa-base" if kind == "vqa" else "Salesforce/blip-image-captioning-base"
            raise ValueError(f"{self.model_id!r} is a BLIP {self.head} model; a {kind} task needs a {kind} checkpoint such as {other}")

    # -- the victim contract ---------------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        self.load()
        return resize_and_crop(images, self.input_size)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise(pixels, self._image_processor, self.dtype)

    def _image_embeds(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self._model.vision_model(pixel_values=self._normalise(pixels))[0]
        return embeds, torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, T, D]: every token of the vision tower's last layer, what BLIP's text encoder (VQA)
        and decoder (captions) cross-attend to; differentiable w.r.t. ``pixels``."""
        self.load()
        return self._image_embeds(pixels)[0]

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mean-pooled :meth:`image_features` (feature-space and transfer attacks)."""
        return self.image_features(pixels).mean(dim=1)

    def _context(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> tuple[torch.Tensor, torch.Tensor]:
        """What the answer decoder cross-attends to: the question encoded over the image (VQA), or
        the image (captioning)."""
        embeds, mask = self._image_embeds(pixels)
        if kind == "caption":
            return embeds, mask
        question = self._tokenizer(list(prompts), padding=True, return_tensors="pt").to(pixels.device)
        encoded = self._model.text_encoder(
            input_ids=question.input_ids, attention_mask=question.attention_mask,
            encoder_hidden_states=embeds, encoder_attention_mask=mask, return_dict=False,
        )[0]
        return encoded, question.attention_mask

    def prompt_text(self, prompt: str, kind: TaskKind = "vqa") -> str:
        """VQA: the question, which the text encoder reads over the image; captions: the decoder's prompt."""
        return self.caption_prompt if kind == "caption" else prompt

    def decoder_prefix(self, kind: TaskKind) -> list[int]:
        """The decoder's start: [decoder start] for VQA answers, [BOS] + caption prompt for captions."""
        if kind == "vqa":
            return [int(self._model.decoder_start_token_id)]
        bos = int(self._model.config.text_config.bos_token_id)
        return [bos, *self._tokenizer.encode(self.caption_prompt, add_special_tokens=False)]

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind = "vqa") -> torch.Tensor:
        return cross_entropy(*self.target_logits(pixels, prompts, targets, kind))

    def target_logits(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
                      kind: TaskKind = "vqa") -> tuple[torch.Tensor, torch.Tensor]:
        self.load()
        self._check_kind(kind)
        context, context_mask = self._context(pixels, prompts, kind)
        prefix = self.decoder_prefix(kind)
        sep = int(self._model.config.text_config.sep_token_id)
        pad = int(self._model.config.text_config.pad_token_id)
        sequences = [prefix + self._tokenizer.encode(t, add_special_tokens=False) + [sep] for t in targets]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), -100, dtype=torch.long)
        for row, sequence in enumerate(sequences):  # right padding: every prefix starts at position 0
            ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
            labels[row, len(prefix) : len(sequence)] = torch.tensor(sequence[len(prefix):])
        ids, attention, labels = ids.to(pixels.device), attention.to(pixels.device), labels.to(pixels.device)
        logits = self._model.text_decoder(
            input_ids=ids, attention_mask=attention,
            encoder_hidden_states=context, encoder_attention_mask=context_mask, return_dict=True, use_cache=False,
        ).logits.float()
        # position j predicts token j + 1
        return logits[:, :-1], labels[:, 1:]

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind = "vqa") -> list[str]:
        self.load()
        self._check_kind(kind)
        context, context_mask = self._context(pixels, prompts, kind)
        prefix = self.decoder_prefix(kind)
        start = torch.tensor([prefix] * len(prompts), device=pixels.device)
        config = self._model.config.text_config
        generated = self._model.text_decoder.generate(
            input_ids=start, encoder_hidden_states=context, encoder_attention_mask=context_mask,
            eos_token_id=config.sep_token_id, pad_token_id=config.pad_token_id,
            do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
        )
        return [t.strip() for t in self._tokenizer.batch_decode(generated[:, len(prefix):], skip_special_tokens=True)]
