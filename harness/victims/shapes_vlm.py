"""``shapes-vlm``: the offline world's victim, a small ViT + GPT-2 image-to-text model.

It is a real transformers ``VisionEncoderDecoderModel`` built from configs, with a word-level
tokenizer built offline by the ``tokenizers`` library, trained on the shapes world's train split
(VQA answers and captions from one model, selected by the text prompt). Training is deterministic
for a seed and cached as safetensors under ``$CODEFEND_HOME/models``.

The prompt template (:func:`ShapesVLM._sequence_ids`) is shared by ``loss`` and ``generate``, so
an attack optimises exactly the text the model is asked to produce.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.contracts import Preparation, Sample, TaskKind
from harness.objectives import cross_entropy
from harness.plugins import PluginsUser
from harness.paths import CheckpointNotFound, codefend_home, publish_checkpoint
from harness import reproducible
from harness.code_version import files_code_version
from harness.reproducible import deterministic_training, training_environment

PAD, BOS, SEP, EOS, UNK = "[PAD]", "[BOS]", "[SEP]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = [PAD, BOS, SEP, EOS, UNK]
# 2: eager attention and exact GELU in the decoder (weights trained under 1 are not reused);
# 3: answers and captions decode in two batches of their own widths (same loss, other rounding)
MODEL_FORMAT_VERSION = 3
TRAINING_TASKS = ("vqav2", "coco_captions")
"""The task plugins whose shapes-world samples it trains on (VQA answers, then captions)."""
# At these sizes (head width 16, ~20 tokens) PyTorch's CPU flash-attention kernel and GPT-2's
# tanh-GELU (a chain of small elementwise ops) cost more than the matrix products: eager
# attention and the fused exact GELU make a training step 1.8x faster on 2 CPU cores
# (0.129 -> 0.071 s for the quickstart's victim), and every attack pass with it.
ATTENTION = "eager"


@dataclass(frozen=True)
class ShapesVLMConfig:
    """Everything that determines the trained weights (and so the cache key)."""

    seed: int = 0
    image_size: int = 32
    patch_size: int = 4
    # Chosen with benchmarks/victim_sweep.py: the smallest config that reaches >= 0.95 clean VQA
    # accuracy on the shapes test split (0.975 on GPU) while training in ~5 min on 2 CPU cores.
    hidden: int = 96
    encoder_layers: int = 3
    decoder_layers: int = 2
    heads: int = 4
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    max_target_tokens: int = 16

    def fingerprint(self, data_code: Any = None) -> str:
        """The checkpoint key. ``data_code``: the code version of the task plugins whose samples
        it trains on (:meth:`ShapesVLM.training_data_code`)."""
        # the modules that define and train the model, and the code that makes its data: a
        # checkpoint never outlives them
        code = {"training": files_code_version([__file__, reproducible.__file__]), "data": data_code}
        blob = json.dumps({"format": MODEL_FORMAT_VERSION, "code": code, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build_tokenizer(texts: Sequence[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, sep_token=SEP
    )


def _build_model(config: ShapesVLMConfig, vocab_size: int, special_ids: dict[str, int]):
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    encoder = ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden,
        num_hidden_layers=config.encoder_layers,
        num_attention_heads=config.heads,
        intermediate_size=config.hidden * 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    decoder = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=config.hidden,
        n_layer=config.decoder_layers,
        n_head=config.heads,
        n_inner=config.hidden * 2,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=special_ids[BOS],
        eos_token_id=special_ids[EOS],
        pad_token_id=special_ids[PAD],
    )
    vcfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    vcfg.decoder_start_token_id = special_ids[BOS]
    vcfg.pad_token_id = special_ids[PAD]
    vcfg.eos_token_id = special_ids[EOS]
    return VisionEncoderDecoderModel._from_config(vcfg, attn_implementation=ATTENTION)


class ShapesVLM(PluginsUser):
    """The built-in victim. Parameters select (and if needed train) a cached checkpoint."""

    name = "shapes-vlm"
    # The model normalises inside its graph; attacks see [0,1] pixels.
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, *, seed: int = 0, steps: int = ShapesVLMConfig.steps, batch_size: int = ShapesVLMConfig.batch_size,
                 lr: float = ShapesVLMConfig.lr, hidden: int = ShapesVLMConfig.hidden,
                 encoder_layers: int = ShapesVLMConfig.encoder_layers, decoder_layers: int = ShapesVLMConfig.decoder_layers,
                 patch_size: int = ShapesVLMConfig.patch_size, checkpoint: str | None = None, device: str | None = None):
        sizes = {"steps": steps, "batch_size": batch_size, "hidden": hidden, "encoder_layers": encoder_layers,
                 "decoder_layers": decoder_layers, "patch_size": patch_size}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shapes-vlm {name} must be an integer >= 1, got {value!r}")
        if ShapesVLMConfig.image_size % patch_size:
            raise ValueError(f"shapes-vlm patch_size must divide the image size {ShapesVLMConfig.image_size}, got {patch_size}")
        if hidden % ShapesVLMConfig.heads:
            raise ValueError(f"shapes-vlm hidden must be a multiple of its {ShapesVLMConfig.heads} heads, got {hidden}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1:
            raise ValueError(f"shapes-vlm lr must be a number in (0, 1), got {lr!r}")
        self.config = ShapesVLMConfig(seed=seed, lr=float(lr), **sizes)
        self._device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.checkpoint = Path(checkpoint).expanduser() if checkpoint else None
        self.input_size = (self.config.image_size, self.config.image_size)
        self._model = None
        self._tokenizer = None
        self._fingerprint: str | None = None
        if self.checkpoint is not None and not self.is_trained():
            raise CheckpointNotFound(self._missing_checkpoint())

    def _missing_checkpoint(self) -> str:
        return (f"shapes-vlm checkpoint not found: looked for model.safetensors and tokenizer.json in "
                f"{self.checkpoint}. Remove 'checkpoint' to train one, or run `codefend train shapes-vlm`.")

    # -- loading ---------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        return codefend_home() / "models" / f"shapes-vlm-{self.config.fingerprint(self.training_data_code())}"

    def training_data_code(self) -> dict[str, str]:
        """The code versions of the task plugins that make its training samples."""
        return {name: self.plugins.tasks.get(name).code_version() for name in TRAINING_TASKS}

    def is_trained(self) -> bool:
        return (self.cache_dir / "model.safetensors").exists() and (self.cache_dir / "tokenizer.json").exists()

    def preparations(self) -> list[Preparation]:
        """Training the weights (none for a given checkpoint)."""
        if self.checkpoint is not None:
            return []
        return [Preparation(
            key=self.cache_dir.name, label="train shapes-vlm",
            run=functools.partial(_prepare_shapes_vlm, self.config, self._device_name),
            cost=2.0 * self.config.steps * self.config.batch_size, done=self.is_trained,
        )]

    def load(self, *, progress: bool = True) -> None:
        if self._model is not None:
            return
        if not self.is_trained():
            if self.checkpoint is not None:
                raise CheckpointNotFound(self._missing_checkpoint())
            with torch.enable_grad():  # load() may first be reached from generate(), under no_grad
                train_shapes_vlm(self.config, self.cache_dir, self.plugins.tasks, progress=progress,
                                 device=self._device_name)
        from transformers import PreTrainedTokenizerFast, VisionEncoderDecoderModel

        self._tokenizer = PreTrainedTokenizerFast.from_pretrained(self.cache_dir)
        self._model = VisionEncoderDecoderModel.from_pretrained(
            self.cache_dir, attn_implementation=ATTENTION).eval().to(self._device_name)
        for p in self._model.parameters():
            p.requires_grad_(False)

    @property
    def model(self):
        self.load()
        return self._model

    @property
    def tokenizer(self):
        self.load()
        return self._tokenizer

    @property
    def fingerprint(self) -> str:
        """Hash of the weights file: results key on the exact model, not on its name."""
        if self._fingerprint is None:
            self.load()
            self._fingerprint = self.fingerprint_without_loading()
        return self._fingerprint

    def fingerprint_without_loading(self) -> str | None:
        if self._fingerprint is None and self.is_trained():
            digest = hashlib.sha256((self.cache_dir / "model.safetensors").read_bytes())
            self._fingerprint = f"shapes-vlm:{digest.hexdigest()[:16]}"
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the victim contract ---------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = self.input_size[::-1]
        arrays = []
        for image in images:
            pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
            if pil.size != size:
                pil = pil.resize(size, Image.BICUBIC)
            arrays.append(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def prompt_text(self, prompt: str, kind: TaskKind = "vqa") -> str:
        """What the decoder reads before the answer: ``[BOS] prompt [SEP]`` (one template for both tasks)."""
        return f"{BOS} {prompt} {SEP}"

    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False), tok.sep_token_id]

    def _sequence_ids(self, prompt: str, target: str) -> tuple[list[int], int]:
        """Token ids of ``[BOS] prompt [SEP] target [EOS]`` and where the target starts."""
        prefix = self._prompt_ids(prompt)
        target_ids = self.tokenizer.encode(target, add_special_tokens=False)[: self.config.max_target_tokens]
        return prefix + target_ids + [self.tokenizer.eos_token_id], len(prefix)

    @property
    def soft_prompt_dim(self) -> int:
        """Width of the decoder's token embeddings (a soft prompt is [tokens, soft_prompt_dim])."""
        return int(self.model.decoder.get_input_embeddings().embedding_dim)

    def _decoder_embeds(self, input_ids: torch.Tensor, soft_prompt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoder inputs with ``soft_prompt`` ([T, D] shared, or [B, T, D] per sample) inserted
        right after [BOS]. The soft tokens share [BOS]'s position, so every real token keeps the
        position it had in training."""
        embeds = self.model.decoder.get_input_embeddings()(input_ids)
        soft = _per_sample_soft_prompt(soft_prompt, input_ids.shape[0]).to(embeds.dtype)
        m, width = soft.shape[1], input_ids.shape[1]
        positions = torch.cat([torch.zeros(m + 1, dtype=torch.long), torch.arange(1, width)]).to(input_ids.device)
        return {
            "decoder_inputs_embeds": torch.cat([embeds[:, :1], soft, embeds[:, 1:]], dim=1),
            "decoder_position_ids": positions.unsqueeze(0).expand(input_ids.shape[0], -1),
        }

    def loss(
        self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind = "vqa",
        soft_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return cross_entropy(*self.target_logits(pixels, prompts, targets, kind, soft_prompt=soft_prompt))

    def target_logits(
        self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind = "vqa",
        soft_prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sequences = [self._sequence_ids(p, t) for p, t in zip(prompts, targets)]
        input_ids, labels, attention = _teacher_forcing_batch(sequences, self.tokenizer.pad_token_id)
        input_ids, labels, attention = (t.to(pixels.device) for t in (input_ids, labels, attention))
        if soft_prompt is None:
            logits = self.model(
                pixel_values=self._normalise(pixels), decoder_input_ids=input_ids, decoder_attention_mask=attention
            ).logits
            return logits, labels
        m = soft_prompt.shape[-2]
        logits = self.model(
            pixel_values=self._normalise(pixels),
            **self._decoder_embeds(input_ids, soft_prompt),
            decoder_attention_mask=torch.cat([attention[:, :1].expand(-1, m), attention], dim=1),
        ).logits
        # the soft tokens predict nothing: drop their positions (the one after [BOS] included)
        return torch.cat([logits[:, :1], logits[:, 1 + m :]], dim=1), labels

    @torch.no_grad()
    def generate(
        self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind = "vqa",
        soft_prompt: torch.Tensor | None = None,
    ) -> list[str]:
        outputs: list[str] = [""] * len(prompts)
        # Prompts of equal length decode together: GPT-2 positions stay those of training.
        groups: dict[int, list[int]] = {}
        prefixes = [self._prompt_ids(p) for p in prompts]
        for i, prefix in enumerate(prefixes):
            groups.setdefault(len(prefix), []).append(i)
        normalised = self._normalise(pixels)
        for indices in groups.values():
            prefix = torch.tensor([prefixes[i] for i in indices], device=pixels.device)
            if soft_prompt is None:
                generated = self.model.generate(
                    pixel_values=normalised[indices],
                    decoder_input_ids=prefix,
                    decoder_attention_mask=torch.ones_like(prefix),
                    max_new_tokens=self.config.max_target_tokens + 1,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            else:
                own = _per_sample_soft_prompt(soft_prompt, len(prompts))[indices]
                generated = self._greedy_with_soft_prompt(normalised[indices], prefix, own)
            texts = self.tokenizer.batch_decode(generated[:, prefix.shape[1] :], skip_special_tokens=True)
            for i, text in zip(indices, texts):
                outputs[i] = text.strip()
        return outputs

    def _greedy_with_soft_prompt(self, normalised: torch.Tensor, prefix: torch.Tensor, soft_prompt: torch.Tensor) -> torch.Tensor:
        """Greedy decoding from embeddings (``generate`` cannot splice embeddings mid-prompt)."""
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=self.model.encoder(pixel_values=normalised).last_hidden_state)
        ids = prefix
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        for _ in range(self.config.max_target_tokens + 1):
            logits = self.model(encoder_outputs=encoded, **self._decoder_embeds(ids, soft_prompt)).logits
            nxt = logits[:, -1].argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        return ids

    def query_encoder(self) -> "ShapesQueryEncoder":
        """A frozen copy of the decoder (GPT-2 with cross-attention to the image tokens): the base
        of CoDefend's prefix generator (:class:`~harness.contracts.QueryEncoderVictim`)."""
        return ShapesQueryEncoder(self)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every encoder token the decoder cross-attends to, [B, tokens, D] (differentiable)."""
        return self.model.encoder(pixel_values=self._normalise(pixels)).last_hidden_state

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder features, for feature-space attacks and alignment losses."""
        return self.image_features(pixels).mean(dim=1)


def _per_sample_soft_prompt(soft_prompt: torch.Tensor, batch: int) -> torch.Tensor:
    """[T, D] -> [batch, T, D] (one prompt for all); [batch, T, D] as it is."""
    if soft_prompt.dim() == 2:
        return soft_prompt.unsqueeze(0).expand(batch, -1, -1)
    if soft_prompt.dim() != 3 or soft_prompt.shape[0] != batch:
        raise ValueError(f"soft_prompt must be [tokens, dim] or [{batch}, tokens, dim] for {batch} prompts, "
                         f"got {tuple(soft_prompt.shape)}")
    return soft_prompt


class ShapesQueryEncoder(torch.nn.Module):
    """shapes-vlm's decoder transformer, copied and frozen, reading ``[BOS] query [SEP]`` then the
    slots (left-padded, so every sample's slots end the sequence) and cross-attending to the image
    tokens when given; returns the final hidden states at the slots, [B, T, D]."""

    lora_targets = ("c_attn", "q_attn", "c_proj", "c_fc")

    def __init__(self, victim: "ShapesVLM"):
        import copy

        super().__init__()
        self.transformer = copy.deepcopy(victim.model.decoder.transformer)
        for p in self.transformer.parameters():
            p.requires_grad_(False)
        self._prompt_ids = victim._prompt_ids
        self._pad = int(victim.tokenizer.pad_token_id)
        self._start = int(victim.tokenizer.bos_token_id)

    def neutral_prefix(self, tokens: int) -> torch.Tensor:
        """Copies of [BOS]'s embedding: the soft tokens share its position, so one such token
        leaves shapes-vlm's answers unchanged (measured: 0.920 VQA on 300 val questions with and
        without it; 4 random tokens of scale 0.02 cost 2.2 points)."""
        return self.transformer.wte.weight[self._start].detach().clone().repeat(tokens, 1)

    def forward(self, prompts: Sequence[str], slots: torch.Tensor,
                image_features: torch.Tensor | None) -> torch.Tensor:
        ids = [self._prompt_ids(p) for p in prompts]
        width, device = max(len(i) for i in ids), slots.device
        input_ids = torch.full((len(ids), width), self._pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), width + slots.shape[0]), dtype=torch.long, device=device)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = torch.tensor(seq, device=device)
            mask[row, width - len(seq):] = 1
        embeds = torch.cat([self.transformer.wte(input_ids), slots.unsqueeze(0).expand(len(ids), -1, -1)], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.transformer(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  encoder_hidden_states=image_features).last_hidden_state
        return hidden[:, width:]


def _teacher_forcing_batch(
    sequences: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (sequence minus its last token), labels (-100 outside the target) and mask."""
    width = max(len(seq) for seq, _ in sequences) - 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, start) in enumerate(sequences):
        n = len(seq) - 1
        input_ids[row, :n] = torch.tensor(seq[:-1])
        attention[row, :n] = 1
        # label at position j is token j+1; target tokens are seq[start:]
        labels[row, start - 1 : n] = torch.tensor(seq[start:])
    return input_ids, labels, attention


# -- training -----------------------------------------------------------------------------------


def _prepare_shapes_vlm(config: ShapesVLMConfig, device: str, *, plugins: Any) -> None:
    victim = ShapesVLM(device=device)
    victim.config = config
    victim.bind_plugins(plugins)  # its key holds the code of the tasks it trains on
    if not victim.is_trained():
        with torch.enable_grad():
            train_shapes_vlm(config, victim.cache_dir, plugins.tasks, progress=False, device=device)


def _training_samples(config: ShapesVLMConfig, tasks: Any) -> tuple[list[Sample], list[Sample]]:
    """The shapes world's train split, through the registered tasks' contract (the kernel
    imports no task package)."""
    vqa, captions = (tasks.create(name, {"data": "shapes"}) for name in TRAINING_TASKS)
    return vqa.samples("train", None, seed=config.seed), captions.samples("train", None, seed=config.seed)


@deterministic_training
def train_shapes_vlm(
    config: ShapesVLMConfig, out_dir: Path, tasks: Any, *, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Train shapes-vlm from ``config`` (deterministic for its seed) and save it to ``out_dir``,
    on the shapes world's train split read through ``tasks`` (a task registry: ``vqav2`` and
    ``coco_captions``).

    A step takes ``batch_size`` images and every text of each (its questions and its first
    caption): the encoder runs once per image, which makes CPU training several times faster.
    """
    from tqdm.auto import tqdm
    from transformers.modeling_outputs import BaseModelOutput

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    vqa_samples, caption_samples = _training_samples(config, tasks)
    texts_by_image: dict[Any, list[tuple[str, str]]] = {}
    images: dict[Any, np.ndarray] = {}
    for s in caption_samples:
        # One model, both tasks: the prompt tells it which. Captions train on the first reference.
        images[s.meta["image_id"]] = s.image
        texts_by_image.setdefault(s.meta["image_id"], []).append((s.prompt, s.references[0]))
    for s in vqa_samples:
        images.setdefault(s.meta["image_id"], s.image)
        texts_by_image.setdefault(s.meta["image_id"], []).append((s.prompt, _majority_answer(s.references)))
    image_ids = sorted(images)
    tokenizer = _build_tokenizer([t for pairs in texts_by_image.values() for pair in pairs for t in pair])
    special = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    model = _build_model(config, len(tokenizer), special).to(device)
    model.train()

    # Train through the victim's own template and normalisation code: one code path.
    victim = ShapesVLM()
    victim.config, victim._tokenizer, victim._model = config, tokenizer, model
    pixels = victim.prepare([images[i] for i in image_ids])
    owner: list[int] = []
    sequences: list[tuple[list[int], int]] = []
    # The world's questions and answers repeat: tokenise each distinct pair once (~27k texts,
    # a few thousand distinct), which takes seconds off the critical path of every suite.
    sequence_ids = functools.lru_cache(maxsize=None)(victim._sequence_ids)
    for row, image_id in enumerate(image_ids):
        for prompt, target in texts_by_image[image_id]:
            owner.append(row)
            sequences.append(sequence_ids(prompt, target))
    input_ids, labels, attention = _teacher_forcing_batch(sequences, tokenizer.pad_token_id)
    pixels, input_ids, labels, attention = (t.to(device) for t in (pixels, input_ids, labels, attention))
    owner_t = torch.tensor(owner)
    rows_of_image = [torch.nonzero(owner_t == row).flatten() for row in range(len(image_ids))]
    lengths = attention.sum(dim=1)
    long_rows = lengths > _shorter_width(lengths)

    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)),
    )
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="train shapes-vlm", unit="step", disable=not progress, mininterval=1.0)
    running = None
    for step in bar:
        batch_images = torch.randint(0, len(image_ids), (config.batch_size,), generator=generator)
        seq_index = torch.cat([rows_of_image[i] for i in batch_images.tolist()]).to(device)
        local_owner = torch.repeat_interleave(
            torch.arange(config.batch_size), torch.tensor([len(rows_of_image[i]) for i in batch_images.tolist()])
        ).to(device)
        batch_images = batch_images.to(device)
        encoded = model.encoder(pixel_values=victim._normalise(pixels[batch_images])).last_hidden_state
        per_sequence = []
        # Short texts (answers) and long ones (captions) decode as two batches, each cut to its
        # own longest text: the same loss as one batch padded to the longest caption (causal
        # attention, padding masked), on ~1/3 fewer decoder tokens.
        for in_group in (~long_rows[seq_index], long_rows[seq_index]):
            rows = seq_index[in_group]
            if not len(rows):
                continue
            width = int(lengths[rows].max())
            logits = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded[local_owner[in_group]]),
                decoder_input_ids=input_ids[rows, :width],
                decoder_attention_mask=attention[rows, :width],
            ).logits
            per_sequence.append(cross_entropy(logits, labels[rows, :width]))
        loss = torch.cat(per_sequence).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.3f}")

    model.eval().cpu()
    record = {
        "config": asdict(config),
        "images": len(image_ids),
        "texts": len(sequences),
        "final_loss": running,
        "seconds": round(time.perf_counter() - started, 1),
        **training_environment(),
        "device": device,
    }
    with publish_checkpoint(out_dir) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / "training.json").write_text(json.dumps(record, indent=2))
    return record


def _shorter_width(lengths: torch.Tensor) -> int:
    """The width splitting texts into two decoder batches with the fewest padded tokens."""
    longest = int(lengths.max())
    counts = torch.bincount(lengths, minlength=longest + 1)
    below = torch.cumsum(counts, dim=0)
    # tokens decoded when texts up to width w pad to w and the rest to the longest text
    cost = [int(below[w]) * w + (len(lengths) - int(below[w])) * longest for w in range(1, longest + 1)]
    return 1 + min(range(len(cost)), key=cost.__getitem__)


def _majority_answer(answers: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))
