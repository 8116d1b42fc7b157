"""Transfer and query attacks of AttackVLM (Zhao et al., NeurIPS 2023): ``mf-ii`` and ``mf-tt``.

``mf-ii`` (matching image-image features) never touches the victim: it perturbs the clean image
within the threat model so that a *surrogate* model's image embedding of x+δ has maximal cosine
similarity with the surrogate's embedding of a target image (one that shows what the victim should
say). The surrogate is any registered victim with ``embed_image`` (by default a second
``shapes-vlm`` trained with another seed), created lazily through the plugin registry.

``mf-tt`` (matching text-text features) then refines with victim *outputs* only: a random
gradient-free estimate of the gradient of sim(E_txt(victim output), E_txt(target text)).

Both are targeted: they set ``target_text`` and the runner records whether the output contains it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from attacks.pgd import ascent_step, keep_best, project
from harness.plugins import PluginsUser
from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, EmbeddingVictim, ThreatModel
from harness.registry import FloatOrFraction

DEFAULT_SURROGATE = "shapes-vlm"
DEFAULT_SURROGATE_PARAMS: dict[str, Any] = {"seed": 1}  # never mutated: instances copy it

# Plain, dark background of rendered target scenes: the middle of the world's background greys.
_TARGET_BACKGROUND = (48, 48, 48)


# -- target scenes ---------------------------------------------------------------------------------


def parse_target_scene(text: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs a shapes-world scene showing ``text`` should contain.

    - every "<colour> <shape>" in the text is one object ("a red circle and a blue square");
    - otherwise a text naming exactly one colour and no shape ("red", the answer to "what color
      is the circle?") gives every shape in that colour, so any "what color is the X?" reads it;
    - otherwise a text naming exactly one shape and no colour ("triangle") gives that shape, white.

    Returns ``[]`` when none applies (``"yes"``, ``"2"``, a word outside the world's vocabulary).
    """
    from tasks.shapes_world import COLOURS, SHAPES

    words = [_singular(w) for w in re.findall(r"[a-z]+", text.lower())]
    pairs = [(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]
    if pairs:
        seen: set[tuple[str, str]] = set()
        return [p for p in pairs if not (p in seen or seen.add(p))][: len(SHAPES)]
    colours = sorted({w for w in words if w in COLOURS})
    shapes = sorted({w for w in words if w in SHAPES})
    if len(colours) == 1 and not shapes:
        return [(colours[0], shape) for shape in SHAPES]
    if len(shapes) == 1 and not colours:
        return [("white", shapes[0])]
    return []


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in {"circle", "square", "triangle"} else word


def render_target_scene(pairs: list[tuple[str, str]], size: tuple[int, int]) -> np.ndarray:
    """Draw ``pairs`` side by side on a plain dark background, as the shapes world draws shapes.

    Same colours and the same aliased geometry as :func:`tasks.shapes_world._render` (ellipse,
    rectangle, upright triangle inside a square box); extents are as large as fit, capped at the
    world's largest (15 px at 32x32). ``size`` is (height, width). Returns uint8 HxWx3.
    """
    from tasks.shapes_world import COLOURS

    height, width = size
    image = Image.new("RGB", (width, height), _TARGET_BACKGROUND)
    draw = ImageDraw.Draw(image)
    n = len(pairs)
    gap = max(1, round(width / 32))
    extent = min(round(15 * min(height, width) / 32), (width - (n + 1) * gap) // n, height - 2 * gap)
    if extent < 3:
        raise ValueError(f"a {width}x{height} image is too small to draw {n} target shapes")
    used = n * extent + (n - 1) * gap
    x = (width - used) // 2
    y = (height - extent) // 2
    for colour, shape in pairs:
        fill = COLOURS[colour]
        x1, y1 = x + extent - 1, y + extent - 1
        if shape == "circle":
            draw.ellipse((x, y, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x, y, x1, y1), fill=fill)
        else:
            draw.polygon([((x + x1) / 2, y), (x, y1), (x1, y1)], fill=fill)
        x += extent + gap
    return np.asarray(image, dtype=np.uint8)


def _to_pixels(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 HxWx3 -> float [1,3,H,W] in [0,1] at ``size`` (height, width), bicubic like ``prepare``."""
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


# -- the surrogate ---------------------------------------------------------------------------------


class _SurrogateMixin(PluginsUser):
    """Lazily creates (through the plugin set it was created from) and caches the surrogate model."""

    surrogate: str
    surrogate_params: dict[str, Any]
    _surrogate_model: Any = None

    def _init_surrogate(self, surrogate: str, surrogate_params: dict[str, Any] | None) -> None:
        self.surrogate = surrogate
        self.surrogate_params = dict(DEFAULT_SURROGATE_PARAMS if surrogate_params is None else surrogate_params)
        self._surrogate_model = None

    def bind_plugins(self, plugins: Any) -> None:
        # Cheap checks now (a suite validates its plugins by creating them): the name is
        # registered and the parameters fit its signature. Loading (perhaps training) waits.
        plugins.victims.get(self.surrogate).validate(self.surrogate_params)
        super().bind_plugins(plugins)

    def surrogate_model(self) -> Any:
        if self._surrogate_model is None:
            model = self.plugins.victims.create(self.surrogate, self.surrogate_params)
            # Loading may mean training (a built-in surrogate not cached yet), and this can be
            # reached inside no_grad code: training needs autograd whatever the caller disabled.
            with torch.enable_grad():
                model.load()
            if not isinstance(model, EmbeddingVictim):
                raise TypeError(
                    f"surrogate '{self.surrogate}' has no embed_image(pixels); a transfer attack needs image features"
                )
            self._surrogate_model = model
        return self._surrogate_model

    def surrogate_fingerprint(self) -> str:
        """The surrogate's weights fingerprint (loads it): equal to the victim's means white-box."""
        return self.surrogate_model().fingerprint

    def _surrogate_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels at the surrogate's device and input size (differentiable resize when they differ)."""
        model = self.surrogate_model()
        pixels = pixels.to(model.device)
        size = tuple(getattr(model, "input_size", pixels.shape[-2:]))
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return pixels


# -- mf-ii -----------------------------------------------------------------------------------------


class MFii(_SurrogateMixin, Attack):
    """``mf-ii``: AttackVLM's transfer attack, matching a surrogate's image features of a target image.

    Maximises cos(E_img(x+δ), E_img(x_target)) over δ in the threat ball with signed-gradient
    ascent on the *surrogate* (``surrogate`` / ``surrogate_params``, created through the plugin
    registry and cached on the instance): the victim is never asked for a loss or a gradient. It
    starts at the clean image (as AttackVLM), takes ``steps`` steps of ``step_size`` (AttackVLM:
    ε 8/255, 1/255, 100-300 steps) and returns, per sample, the iterate with the highest surrogate
    similarity. ``losses`` are the mean similarities, first to last (they should rise).

    ``target_image`` is a path to the image to imitate. Without it the target scene is rendered
    from ``target_text`` with the shapes world's colours and geometry on a plain background at the
    victim's input resolution (see :func:`parse_target_scene`); a text it cannot parse ("yes",
    "2") is a ``ValueError`` asking for ``target_image``.

    Pass counts (``forward_passes``/``backward_passes``, per sample) are surrogate passes.
    The attack is deterministic: it uses no randomness.
    """

    requires = "transfer"
    defining_params = ("target_text", "target_image")

    def __init__(
        self,
        *,
        target_text: str,
        target_image: str | None = None,
        surrogate: str = DEFAULT_SURROGATE,
        surrogate_params: dict[str, Any] = DEFAULT_SURROGATE_PARAMS,
        steps: int = 100,
        step_size: FloatOrFraction = 1 / 255,
    ):
        if not target_text or not target_text.strip():
            raise ValueError("target_text must be a non-empty text (what the victim should say)")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.target_text = target_text.strip()
        self.target_image = target_image
        self._scene: list[tuple[str, str]] = []
        if target_image is not None:
            if not Path(target_image).expanduser().is_file():
                raise ValueError(f"target_image: no image file at {target_image!r}")
        else:
            self._scene = parse_target_scene(self.target_text)
            if not self._scene:
                raise ValueError(
                    f"target_image is not given and no target scene can be rendered from target_text "
                    f"{self.target_text!r}: it should name shapes-world objects such as 'a red circle' "
                    f"(or one colour, or one shape); otherwise give target_image (a path to an image)"
                )
        self.steps = steps
        self.step_size = float(step_size)
        self._init_surrogate(surrogate, surrogate_params)

    def passes_per_sample(self) -> tuple[int, int]:
        return (self.steps + 1, self.steps)

    def target_pixels(self, size: tuple[int, int]) -> torch.Tensor:
        """The target image as [1,3,H,W] pixels in [0,1] at ``size`` (height, width)."""
        if self.target_image is not None:
            with Image.open(Path(self.target_image).expanduser()) as pil:
                image = np.asarray(pil.convert("RGB"), dtype=np.uint8)
        else:
            image = render_target_scene(self._scene, size)
        return _to_pixels(image, size)

    @torch.no_grad()
    def target_embedding(self, size: tuple[int, int]) -> torch.Tensor:
        model = self.surrogate_model()
        return model.embed_image(self._surrogate_input(self.target_pixels(size))).detach()

    def similarity(self, pixels: torch.Tensor, target_embedding: torch.Tensor) -> torch.Tensor:
        """Per-sample cosine similarity of the surrogate's embedding of ``pixels`` to the target's."""
        features = self.surrogate_model().embed_image(self._surrogate_input(pixels))
        return F.cosine_similarity(features, target_embedding.expand_as(features), dim=1)

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        clean = batch.pixels.detach()
        # No shortcut at eps = 0: the surrogate loop runs and the projection keeps delta at 0.
        wanted = self.target_embedding(tuple(clean.shape[-2:]))
        delta = torch.zeros_like(clean)
        best = clean.clone()
        best_sim = torch.full((clean.shape[0],), -float("inf"), device=clean.device)
        losses: list[float] = []
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                sim = self.similarity(clean + delta, wanted)
                (grad,) = torch.autograd.grad(sim.sum(), delta)
                with torch.no_grad():
                    sim = sim.detach().to(clean.device)
                    best, best_sim = keep_best(best, best_sim, clean + delta, sim)
                    losses.append(sim.mean().item())
                    delta = project(delta + ascent_step(grad.to(clean.device), threat.norm, self.step_size),
                                    clean, threat.norm, threat.eps)
                if progress is not None:
                    progress.update(1)
        with torch.no_grad():
            sim = self.similarity(clean + delta, wanted).to(clean.device)
            best, _ = keep_best(best, best_sim, clean + delta, sim)
            losses.append(sim.mean().item())
        return AttackResult(pixels=best.detach(), forward_passes=self.steps + 1, backward_passes=self.steps,
                            losses=losses)


# -- mf-tt -----------------------------------------------------------------------------------------


class MFtt(_SurrogateMixin, Attack):
    """``mf-tt``: AttackVLM's query attack, matching text features of the victim's output and target.

    Objective, per sample: s(x) = cos(E_txt(victim output at x), E_txt(target_text)). Each of
    ``steps`` steps queries the victim at the current iterate x (the baseline) and at
    ``num_queries`` points x + σ·u with Rademacher directions u (clamped to [0,1]; these queries
    may lie up to σ outside the ball, only the iterates stay inside), estimates
    g = mean_k[(s(x+σu_k) − s(x))·u_k] / σ and takes a signed step of ``step_size`` (L2:
    normalised step), projected into the ball and [0,1]. It starts from an ``mf-ii`` run with the
    same target when ``start_from_transfer`` (AttackVLM's MF-ii + MF-tt), else from the clean image.
    The returned pixels are, per sample, the iterate with the highest measured s (the final
    iterate is queried once more for that). ``losses`` are the mean s of the iterates, first to last.

    Only ``target.generate`` is called on the victim; ``queries`` counts every output looked at:
    batch × (steps × (num_queries + 1) + 1). The Rademacher draws come from ``batch.seeds``
    (one generator per sample) when given, else from ``generator``.

    E_txt, offline: the mean of the *surrogate* decoder's input token embeddings (its ``wte``
    rows) over the text's word tokens, L2-normalised. AttackVLM uses a CLIP text encoder; the
    surrogate's learned token space is the closest offline stand-in: it gives partial credit to
    near misses (another colour word is closer to "red" than "yes" is, once the surrogate is
    trained), whereas a bag-of-words vector over the vocabulary (the special case with one-hot
    embeddings) scores every miss 0, which leaves the estimator no signal until an output already
    contains the target. A text with no known word embeds as 0 (similarity 0). It uses the
    surrogate, never the victim, so the attack stays query-only.
    """

    requires = "queries"
    defining_params = ("target_text", "target_image")

    def __init__(
        self,
        *,
        target_text: str,
        steps: int = 8,
        num_queries: int = 20,
        sigma: FloatOrFraction = 8 / 255,
        step_size: FloatOrFraction = 1 / 255,
        start_from_transfer: bool = True,
        transfer_steps: int = 100,
        target_image: str | None = None,
        surrogate: str = DEFAULT_SURROGATE,
        surrogate_params: dict[str, Any] = DEFAULT_SURROGATE_PARAMS,
    ):
        if not target_text or not target_text.strip():
            raise ValueError("target_text must be a non-empty text (what the victim should say)")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if transfer_steps < 1:
            raise ValueError(f"transfer_steps must be at least 1, got {transfer_steps}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be at least 1, got {num_queries}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.target_text = target_text.strip()
        self.steps = steps
        self.num_queries = num_queries
        self.sigma = float(sigma)
        self.step_size = float(step_size)
        self.start_from_transfer = start_from_transfer
        self._init_surrogate(surrogate, surrogate_params)
        self.transfer: MFii | None = None
        if start_from_transfer:
            self.transfer = MFii(target_text=self.target_text, target_image=target_image, surrogate=surrogate,
                                 surrogate_params=self.surrogate_params, steps=transfer_steps, step_size=step_size)
        self._text_cache: dict[str, torch.Tensor] = {}

    def surrogate_model(self) -> Any:
        # one surrogate for the transfer start and the text embedding
        if self._surrogate_model is None and self.transfer is not None:
            self._surrogate_model = self.transfer.surrogate_model()
        return super().surrogate_model()

    def queries_per_sample(self) -> int:
        return self.steps * (self.num_queries + 1) + 1

    def passes_per_sample(self) -> tuple[int, int]:
        forward, backward = self.transfer.passes_per_sample() if self.transfer is not None else (0, 0)
        return (forward + self.queries_per_sample(), backward)

    # -- text embedding ----------------------------------------------------------------------------
    def text_embedding(self, text: str) -> torch.Tensor:
        """E_txt(text): normalised mean of the surrogate decoder's input embeddings of its words."""
        if text not in self._text_cache:
            model = self.surrogate_model()
            tokenizer, decoder = model.tokenizer, model.model.decoder
            special = set(tokenizer.all_special_ids)
            ids = [i for i in tokenizer.encode(text, add_special_tokens=False) if i not in special]
            table = decoder.get_input_embeddings().weight.detach()
            if ids:
                vector = F.normalize(table[ids].float().mean(dim=0), dim=0)
            else:
                vector = torch.zeros(table.shape[1], device=table.device)
            self._text_cache[text] = vector.cpu()
        return self._text_cache[text]

    def text_similarity(self, outputs: list[str]) -> torch.Tensor:
        """cos(E_txt(output), E_txt(target_text)) for each output (0 for an empty output)."""
        wanted = self.text_embedding(self.target_text)
        return torch.stack([self.text_embedding(o) @ wanted for o in outputs])

    def _objective(self, target: AttackTarget, pixels: torch.Tensor, batch: AttackBatch, repeat: int = 1) -> torch.Tensor:
        prompts = [p for p in batch.prompts for _ in range(repeat)]
        outputs = target.generate(pixels, prompts, batch.kind)
        return self.text_similarity(list(outputs)).to(pixels.device)

    # -- the attack --------------------------------------------------------------------------------
    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        clean = batch.pixels.detach()
        n = clean.shape[0]
        # No shortcut at eps = 0: the transfer start and the queries run; every iterate is projected
        # onto the clean pixels (the probes x + sigma*u lie outside the ball, as at any eps).
        forward = backward = 0
        if self.transfer is not None:
            start = self.transfer.perturb(target, batch, threat, generator, progress=progress)
            delta = (start.pixels.detach() - clean)
            forward, backward = start.forward_passes, start.backward_passes
        else:
            delta = torch.zeros_like(clean)
        delta = project(delta, clean, threat.norm, threat.eps)
        generators = [torch.Generator().manual_seed(int(s)) for s in batch.seeds] if batch.seeds is not None else None

        queries = 0
        best = clean + delta
        best_sim = torch.full((n,), -float("inf"), device=clean.device)
        losses: list[float] = []
        k = self.num_queries
        with torch.no_grad():
            for _ in range(self.steps):
                current = clean + delta
                base = self._objective(target, current, batch)
                queries += n
                best, best_sim = keep_best(best, best_sim, current, base)
                losses.append(base.mean().item())

                directions = self._rademacher(clean, k, generator, generators)  # [n, k, 3, H, W]
                probes = (current.unsqueeze(1) + self.sigma * directions).clamp(0.0, 1.0)
                probed = self._objective(target, probes.flatten(0, 1), batch, repeat=k).view(n, k)
                queries += n * k
                coef = probed - base.view(n, 1)
                estimate = (coef.view(n, k, 1, 1, 1) * directions).mean(dim=1) / self.sigma
                delta = project(delta + ascent_step(estimate, threat.norm, self.step_size), clean, threat.norm, threat.eps)
                if progress is not None:
                    progress.update(1)
            final = self._objective(target, clean + delta, batch)
            queries += n
            best, _ = keep_best(best, best_sim, clean + delta, final)
            losses.append(final.mean().item())
        return AttackResult(pixels=best, forward_passes=forward + self.queries_per_sample(),
                            backward_passes=backward, queries=queries, losses=losses)

    @staticmethod
    def _rademacher(
        clean: torch.Tensor, k: int, generator: torch.Generator, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        shape = (k, *clean.shape[1:])
        if generators is not None:
            draws = torch.stack([torch.randint(0, 2, shape, generator=g) for g in generators])
        else:
            draws = torch.randint(0, 2, (clean.shape[0], *shape), generator=generator)
        return (draws.to(device=clean.device, dtype=clean.dtype) * 2 - 1)
