"""Hugging Face victims on a tiny LLaVA built from configs (random weights, an offline tokenizer).

The model is saved to a folder in the real checkpoint layout (config.json, model.safetensors,
processor and tokenizer files, chat template) and loaded by path through the same
``from_pretrained`` code a real checkpoint goes through.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.victims.hf import HFImageTextToText, HFLlava
from harness.victims.tiny_models import build_tiny_blip2, build_tiny_llava

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def victim(tiny_llava: Path) -> HFLlava:
    victim = HFLlava(model_id=str(tiny_llava), device="cpu", max_new_tokens=4)
    victim.load()
    return victim


def _images(n: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)]


def test_prepare_resizes_and_crops_outside_the_graph(victim) -> None:
    pixels = victim.prepare(_images(2))
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert victim.input_size == (32, 32)
    assert victim.preprocessing == "resize shortest edge to 32 (bicubic), centre-crop 32x32"


def test_generate_returns_text_greedily(victim) -> None:
    pixels = victim.prepare(_images(3))
    prompts = ["what colour is the shape ?", "how many shapes ?", "describe the image ."]
    first = victim.generate(pixels, prompts, "vqa")
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert victim.generate(pixels, prompts, "vqa") == first  # greedy: deterministic


def test_loss_has_finite_nonzero_pixel_gradients(victim) -> None:
    pixels = victim.prepare(_images(2)).requires_grad_(True)
    loss = victim.loss(pixels, ["what colour is the shape ?"] * 2, ["red", "a blue circle"], "vqa")
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_loss_and_generate_share_one_template_and_score_only_the_answer(victim, monkeypatch) -> None:
    seen: dict[str, torch.Tensor] = {}
    model = victim._model
    original_forward, original_generate = type(model).forward, model.generate

    @functools.wraps(original_forward)  # generate() validates kwargs against forward's signature
    def spy_forward(self, *args, **kwargs):
        seen.setdefault("loss", kwargs["input_ids"].clone())
        return original_forward(self, *args, **kwargs)

    def spy_generate(*args, **kwargs):
        seen["generate"] = kwargs["input_ids"].clone()
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy_forward)
    monkeypatch.setattr(model, "generate", spy_generate)
    pixels = victim.prepare(_images(1))
    victim.loss(pixels, ["what colour is the shape ?"], ["red"], "vqa")
    victim.generate(pixels, ["what colour is the shape ?"], "vqa")
    prompt = seen["generate"][0].tolist()
    tokenizer = victim._processor.tokenizer
    answer = tokenizer.encode("red", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert seen["loss"][0].tolist() == prompt + answer  # the same template, then the answer
    assert prompt.count(4) == 16  # <image> expanded to the 4x4 patch tokens, as the processor does
    # LLaVA-1.5's VQAv2 instruction follows the question, in loss and generate alike
    instruction = "Answer the question using a single word or phrase."
    assert tokenizer.decode(prompt).replace("<image>", "").split() == (
        f"USER : what colour is the shape ? {instruction} ASSISTANT :".split())
    assert victim.prompt_text("what colour is the shape ?", "vqa").count(instruction) == 1
    assert instruction not in victim.prompt_text("Provide a short caption for this image.", "caption")
    # only the answer tokens count: changing the prompt's last token's label would change nothing
    losses = victim.loss(pixels.repeat(2, 1, 1, 1), ["what colour is the shape ?"] * 2, ["red", "red blue"], "vqa")
    assert not torch.isclose(losses[0], losses[1])


def test_missing_weights_name_what_and_where(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        HFImageTextToText(model_id=str(missing)).load()
    message = str(info.value)
    assert str(missing) in message and "Hugging Face cache" in message and "huggingface-cli download" in message
    with pytest.raises(FileNotFoundError, match="llava-hf/llava-1.5-7b-hf"):
        HFLlava(model_id="llava-hf/llava-1.5-7b-hf").load()


def test_pgd_runs_end_to_end_through_the_runner(tiny_llava: Path, trained_home, tmp_path: Path, run_cli) -> None:
    suite = tmp_path / "llava.yaml"
    suite.write_text(
        "name: tiny-llava\nseed: 0\nbatch_size: 4\n"
        f"victims:\n  - {{name: hf-llava, params: {{model_id: '{tiny_llava}', max_new_tokens: 3, device: cpu}}}}\n"
        "tasks:\n  - {name: vqav2, data: shapes, split: test, n: 4}\n"
        "threat_models:\n  linf-8: {norm: linf, eps: 8/255}\n"
        "attacks:\n  - name: none\n  - {name: pgd, threats: [linf-8], params: {steps: 3}}\n"
        "defenses:\n  - name: none\n"
    )
    result = run_cli("run", suite, "--out", tmp_path / "out", "--quiet", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "## hf-llava · vqav2:test — vqa_accuracy (n=4)" in result.stdout
    from harness.store import Store

    store = Store(tmp_path / "out" / "store.sqlite")
    try:
        rows = list(store.results())
        pgd = [r for r in rows if r.attack == "pgd"]
        assert len(pgd) == 4 and all(r.record.perturbation.linf <= 8 / 255 + 1e-6 for r in pgd)
        assert pgd[0].record.threat.space == "victim input 32x32, [0,1]"
        # every row records the exact text its victim was sent, the instruction included
        assert all("Answer the question using a single word or phrase." in r.record.victim.prompt for r in rows)
        losses = pgd[0].record.attack_cost
        assert losses.loss_last > losses.loss_first  # the attack's loss rose on the real model code
    finally:
        store.close()


# -- BLIP-2 ---------------------------------------------------------------------------------------------

def _check_target_logits(victim, pixels: torch.Tensor, prompts: list[str], targets: list[str], kind: str,
                         tokenizer, end_id: int) -> None:
    """``target_logits`` labels each target's tokens and then the end token generation stops at,
    ``loss`` is their cross-entropy, and the DLR margin of them has a gradient (the standard
    attack's restart raises it)."""
    from harness.objectives import cross_entropy, dlr

    x = pixels.detach().clone().requires_grad_(True)
    logits, labels = victim.target_logits(x, prompts, targets, kind)
    for row, target in zip(labels, targets):
        assert row[row != -100].tolist() == tokenizer.encode(target, add_special_tokens=False) + [end_id]
    assert torch.allclose(cross_entropy(logits, labels), victim.loss(x, prompts, targets, kind))
    (grad,) = torch.autograd.grad(dlr(logits, labels).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_blip2_adapter_templates_gradients_and_generation(tmp_path: Path) -> None:
    from harness.victims.hf import HFBlip2

    victim = HFBlip2(model_id=str(build_tiny_blip2(tmp_path / "blip2")), device="cpu", max_new_tokens=3)
    victim.load()
    assert victim.input_size == (32, 32) and victim.preprocessing == "resize to 32x32 (bicubic)"
    (vqa,) = victim.prompt_ids(["what colour is the shape ?"], "vqa")
    assert vqa[:4] == [4, 4, 4, 4]  # the query-token placeholders, then the BLIP-2 template
    assert victim._processor.tokenizer.decode(vqa[4:]).split() == "Question: what colour is the shape ? Short answer:".split()
    assert victim.prompt_ids(["describe the image"], "caption")[0] == [4, 4, 4, 4]  # BLIP-2 captions from no prompt
    pixels = victim.prepare(_images(2)).requires_grad_(True)
    loss = victim.loss(pixels, ["what colour is the shape ?"] * 2, ["red", "blue"], "vqa")
    (grad,) = torch.autograd.grad(loss.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    outputs = victim.generate(pixels.detach(), ["what colour is the shape ?"] * 2, "vqa")
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    tokenizer = victim._processor.tokenizer
    _check_target_logits(victim, pixels, ["what colour is the shape ?"] * 2, ["red", "a blue circle"], "vqa",
                         tokenizer, tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="expects a blip-2 or instructblip checkpoint"):
        HFBlip2(model_id=str(build_tiny_llava(tmp_path / "llava"))).load()


def test_image_embeddings_are_differentiable_for_transfer_attacks(victim) -> None:
    pixels = victim.prepare(_images(2)).requires_grad_(True)
    features = victim.image_features(pixels)
    assert features.dim() == 3 and features.shape[0] == 2
    embedding = victim.embed_image(pixels)
    (grad,) = torch.autograd.grad(embedding.pow(2).sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_paper_suite_validates_here(run_cli) -> None:
    result = run_cli("validate", "suites/paper.yaml")
    assert result.returncode == 0, result.stderr
    # 96 cells of the suite's own, 208 of the standard adaptive protocol through every defense
    assert "304 cells" in result.stdout and "estimated passes:" in result.stdout
    # the GPU-hour estimate counts the adaptive protocol's EOT passes and the trainings, at a stated rate
    time_line = next(line for line in result.stdout.splitlines() if line.startswith("estimated time: "))
    assert "GPU-hours at 12.5 ms per pass" in time_line and "of training" in time_line
    assert ("standard adaptive protocol: apgd {'steps': 100, 'restarts': 1, 'objectives': ['ce', 'dlr']}, EOT 20"
            in result.stdout)
    assert "hf-llava | vqav2[data/vqav2]:val2014 | ensemble@linf@8/255 | codefend" in result.stdout


# -- BLIP -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head,kind,prompt", [("vqa", "vqa", "what colour is the shape ?"), ("caption", "caption", "describe")])
def test_blip_adapter_one_template_gradients_generation(head: str, kind: str, prompt: str, tmp_path: Path, monkeypatch) -> None:
    from harness.victims.hf_blip import HFBlip
    from harness.victims.tiny_models import build_tiny_blip

    victim = HFBlip(model_id=str(build_tiny_blip(tmp_path / head, head)), device="cpu", max_new_tokens=3)
    victim.load()
    assert victim.head == head and victim.input_size == (32, 32)
    pixels = victim.prepare(_images(2)).requires_grad_(True)
    loss = victim.loss(pixels, [prompt] * 2, ["red", "a blue circle"], kind)
    (grad,) = torch.autograd.grad(loss.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    _check_target_logits(victim, pixels, [prompt] * 2, ["red", "a blue circle"], kind, victim._tokenizer,
                         victim._model.config.text_config.sep_token_id)

    decoder = victim._model.text_decoder
    seen: list[list[int]] = []
    original_forward = type(decoder).forward

    @functools.wraps(original_forward)
    def spy(self, *args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "forward", spy)
    outputs = victim.generate(pixels.detach(), [prompt] * 2, kind)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    generate_start = seen[0]
    seen.clear()
    victim.loss(pixels.detach()[:1], [prompt], ["red"], kind)
    red = victim._tokenizer.encode("red", add_special_tokens=False)
    assert seen[0] == generate_start + red + [victim._model.config.text_config.sep_token_id]
    assert generate_start == victim.decoder_prefix(kind)
    if kind == "caption":
        assert victim._tokenizer.decode(generate_start[1:]) == "a picture of"
    other = "caption" if kind == "vqa" else "vqa"
    with pytest.raises(ValueError, match=f"is a BLIP {head} model"):
        victim.generate(pixels.detach(), [prompt], other)

    # CoDefend's task-aligned purifier term and mf-ii read the tokens the text side attends to
    from harness.contracts import EmbeddingVictim, ImageFeatureVictim

    assert isinstance(victim, ImageFeatureVictim) and isinstance(victim, EmbeddingVictim)
    features = victim.image_features(pixels)
    assert features.dim() == 3 and features.shape[0] == 2
    (grad,) = torch.autograd.grad(features.pow(2).sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert victim.embed_image(pixels.detach()).shape == (2, features.shape[-1])


def test_the_generic_adapter_loads_any_image_text_to_text_checkpoint(tiny_llava: Path) -> None:
    generic = HFImageTextToText(model_id=str(tiny_llava), device="cpu", max_new_tokens=2)
    pixels = generic.prepare(_images(1))
    assert len(generic.generate(pixels, ["what colour is the shape ?"], "vqa")) == 1
    assert generic.fingerprint.startswith("hf-image-text-to-text:")
    assert generic.fingerprint != HFLlava(model_id=str(tiny_llava), device="cpu", dtype="bfloat16").fingerprint
    # a template or answer length is part of what the rows key on
    assert HFLlava(model_id=str(tiny_llava), device="cpu").fingerprint != HFLlava(
        model_id=str(tiny_llava), device="cpu", vqa_template="{prompt}").fingerprint
    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        HFLlava(model_id=str(tiny_llava), vqa_template="Answer briefly.")
    with pytest.raises(ValueError, match="max_new_tokens_by_task"):
        HFLlava(model_id=str(tiny_llava), max_new_tokens_by_task={"vqa": 0})


def test_instructblip_threads_the_qformer_instruction_through_loss_and_generate(tmp_path: Path, monkeypatch) -> None:
    from harness.victims.hf import HFBlip2
    from harness.victims.tiny_models import build_tiny_instructblip

    victim = HFBlip2(model_id=str(build_tiny_instructblip(tmp_path / "iblip")), device="cpu", max_new_tokens=3)
    victim.load()
    (inputs,) = victim.prompt_inputs(["what colour is the shape ?"], "vqa")
    assert set(inputs) == {"input_ids", "qformer_input_ids"}
    seen: list[dict] = []
    model = victim._model
    original_forward = type(model).forward

    @functools.wraps(original_forward)
    def spy(self, *args, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k.startswith("qformer")})
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    pixels = victim.prepare(_images(2)).requires_grad_(True)
    loss = victim.loss(pixels, ["what colour is the shape ?", "what is the shape ?"], ["red", "a circle"], "vqa")
    (grad,) = torch.autograd.grad(loss.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert seen[0]["qformer_input_ids"][0].tolist() == inputs["qformer_input_ids"]
    assert seen[0]["qformer_attention_mask"][1].sum() < seen[0]["qformer_attention_mask"][0].sum()  # padded, masked
    outputs = victim.generate(pixels.detach(), ["what colour is the shape ?"] * 2, "vqa")
    assert len(outputs) == 2 and "qformer_input_ids" in seen[-1]


# -- gradient checkpointing ---------------------------------------------------------------------


def _layer_calls(model: torch.nn.Module) -> tuple[list[int], list]:
    """A counter of the calls to the modules inside the transformer layers (a recomputed layer
    runs its forward directly, so its submodules are what shows it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]
    inside = {id(sub): sub for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer)
              for sub in layer.modules() if sub is not layer}
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in inside.values()]
    return calls, hooks


@pytest.mark.parametrize("adapter", ["hf-llava", "hf-blip2", "hf-blip"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients_exact(adapter: str, tmp_path: Path) -> None:
    """In eval mode (no dropout), the checkpointed victim's pixel gradients are the unchecked ones,
    and its layers really run again on the backward pass (activations were not kept)."""
    from harness.victims.hf import HFBlip2
    from harness.victims.hf_blip import HFBlip
    from harness.victims.tiny_models import build_tiny_blip

    build, cls = {"hf-llava": (build_tiny_llava, HFLlava), "hf-blip2": (build_tiny_blip2, HFBlip2),
                  "hf-blip": (build_tiny_blip, HFBlip)}[adapter]
    folder = build(tmp_path / adapter)
    prompts, targets = ["what colour is the shape ?"] * 2, ["red", "a blue circle"]
    grads, calls = {}, {}
    for setting in (False, True):
        victim = cls(model_id=str(folder), device="cpu", gradient_checkpointing=setting)
        victim.load()
        assert (victim.checkpointed_layers > 0) is setting
        counter, hooks = _layer_calls(victim._model)
        pixels = victim.prepare(_images(2)).requires_grad_(True)
        loss = victim.loss(pixels, prompts, targets, "vqa")
        forward_calls = counter[0]
        (grads[setting],) = torch.autograd.grad(loss.sum(), pixels)
        calls[setting] = (forward_calls, counter[0])
        for hook in hooks:
            hook.remove()
        # generation runs without gradients, so nothing is recomputed and nothing changes
        assert victim.generate(pixels.detach(), prompts, "vqa") == victim.generate(pixels.detach(), prompts, "vqa")
    assert calls[False][0] == calls[False][1] > 0  # unchecked: no layer runs on the backward pass
    assert calls[True][1] == 2 * calls[True][0] == 2 * calls[False][0]  # checkpointed: each runs again
    assert grads[True].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_defaults_to_the_gpu_only() -> None:
    from harness.victims.hf import wants_checkpointing

    assert not wants_checkpointing(None, "cpu", None)
    assert wants_checkpointing(None, "cuda", None) and wants_checkpointing(None, "cuda:1", None)
    assert wants_checkpointing(None, "cpu", "auto")  # accelerate places it, on the GPUs it sees
    assert wants_checkpointing(True, "cpu", None) and not wants_checkpointing(False, "cuda", None)
    with pytest.raises(ValueError, match="gradient_checkpointing must be true, false or null"):
        HFLlava(model_id="x", gradient_checkpointing="yes")
