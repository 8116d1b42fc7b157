"""The result row: one typed record that the runner writes, the store keeps and the leaderboard
reads. docs/results-schema.md documents its fields from this module (``python -m
harness.records`` prints that table; a test keeps the document equal to it).

A row is one (cell, sample): :class:`ResultRow`'s columns are the store's ``results`` columns,
and :class:`RowRecord` is its ``record`` column, a JSON object. Rows written by earlier versions
of the harness read back with defaults for what they lack; keys this version does not know are
ignored.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.labels import Label
from harness.suite import AttackRole

_RECORD = ConfigDict(extra="ignore", frozen=True)


class VictimInfo(BaseModel):
    model_config = _RECORD
    prompt: str = Field("", description="the exact text the victim was sent for this sample: its per-task template "
                                        "and chat template around the task prompt, after any prompt defense")


class TargetedInfo(BaseModel):
    model_config = _RECORD
    text: str = Field(description="the text a targeted attack wants the victim to say")
    success: bool = Field(description="whether the output says it (case-insensitive, word-bounded)")


class AttackInfo(BaseModel):
    model_config = _RECORD
    name: str = Field("none", description="the attack plugin")
    params: dict[str, Any] = Field(default_factory=dict, description="its parameters, as the suite gave them")
    mode: Literal["oblivious", "adaptive"] = Field(
        "oblivious", description="oblivious: computed on the undefended victim; adaptive: through this row's defense")
    gradient: str | None = Field(None, description="adaptive rows: the gradient route (exact, bpda-identity, "
                                                   "bpda-approximate, or none for query attacks)")
    eot: int | None = Field(None, description="adaptive rows: expectation-over-transformation draws per step")
    surrogate_process: str | None = Field(
        None, description="adaptive rows attacked through a surrogate process (Lee & Kim): what it is")
    eot_grafting: bool = Field(False, description="adaptive rows: the EOT draws' gradients were grafted onto one "
                                                  "backward pass through the defense (DiffHammer), not exact")
    judging_draws: int = Field(1, description="adaptive rows through a stochastic defense: purification draws the "
                                              "attack averaged each judgement of a sample over (which samples its "
                                              "restarts attack, which example each keeps)")
    access: Literal["white-box", "query", "transfer", "none"] = Field(
        "none", description="what the attack used of the victim; a transfer attack whose surrogate is the victim is white-box")
    role: AttackRole = Field("suite", description="suite (declared in the suite), or which cell of the standard "
                                                  "adaptive protocol (harness.suite.AttackRole)")
    draws: int = Field(1, description="purification draws the output was judged over (N-draw evaluation)")
    training_label: Label = Field(
        "unseen", description="against the defense's training attacks: same attack and eps, same attack at "
                              "another eps, or neither")
    seen_in_training: bool = Field(False, description="training_label == 'seen'")
    surrogate: str | None = Field(None, description="transfer attacks: the surrogate victim")
    surrogate_is_victim: bool = Field(False, description="transfer attacks: the surrogate is the victim itself")
    reused: bool = Field(False, description="the example was not computed by this row's own node: oblivious examples "
                                            "come from the shared attack node, N-draw rows reuse the adaptive attack's")
    targeted: TargetedInfo | None = Field(None, description="targeted attacks: the target text and its success")

    @model_validator(mode="before")
    @classmethod
    def _surrogate_process_of_older_rows(cls, data: Any) -> Any:
        # rows before the typed record kept an adaptive route's surrogate process under
        # `surrogate`, the key of a transfer attack's surrogate victim
        if isinstance(data, dict) and data.get("mode") == "adaptive" and "surrogate_is_victim" not in data \
                and "surrogate" in data and "surrogate_process" not in data:
            data = {**data, "surrogate_process": data["surrogate"]}
            del data["surrogate"]
        return data


class ThreatInfo(BaseModel):
    model_config = _RECORD
    name: str = Field("clean", description="the threat model's name in the suite")
    norm: Literal["linf", "l2"] = Field("linf", description="the ball's norm")
    eps: float = Field(0.0, description="the ball's radius in [0,1] pixel units, at the victim's input resolution")
    bounded: bool = Field(True, description="whether the attack is bounded by the threat model (typographic is not)")
    space: str = Field("", description="where the ball lives: the victim's input resolution and [0,1]")


class Perturbation(BaseModel):
    model_config = _RECORD
    linf: float = Field(0.0, description="L-infinity norm of (stored adversarial - clean) pixels")
    l2: float = Field(0.0, description="L2 norm of the same difference")


class DefenseInfo(BaseModel):
    model_config = _RECORD
    name: str = Field("none", description="the defense plugin")
    params: dict[str, Any] = Field(default_factory=dict, description="its parameters, as the suite gave them")
    stochastic: bool = Field(False, description="its declaration: purification draws differ")
    seconds_per_image: float | None = Field(None, description="wall time of purify per image")
    passes_per_image: int | None = Field(None, description="network evaluations of purify per image")
    seen_attacks: list[str] = Field(default_factory=list, description="the attacks whose examples it was trained on")
    psnr: float | None = Field(None, description="dB, its output against the clean image, data range 1; "
                                                 "null where the output equals the clean image")
    ssim: float | None = Field(None, description="SSIM of its output against the clean image, data range 1")


class AttackCost(BaseModel):
    model_config = _RECORD
    seconds_per_sample: float | None = Field(None, description="wall time of the attack batch per sample")
    forward_passes: int = Field(0, description="victim (or defended victim) forward passes of the batch")
    backward_passes: int = Field(0, description="backward passes of the batch")
    queries: int = Field(0, description="output queries of the batch (query attacks)")
    loss_first: float | None = Field(None, description="mean attack loss at the start (like-for-like for ensembles)")
    loss_last: float | None = Field(None, description="mean attack loss at the end: the loss-rise check compares them")
    objectives_unavailable: list[str] = Field(
        default_factory=list, description="objectives the attack was declared with that its target could not give "
                                          "(replaced by cross-entropy: a weaker attack, flagged on the board)")


class RowImages(BaseModel):
    model_config = _RECORD
    clean: str = Field(description="artifact digest of the clean image")
    defended: str = Field(description="artifact digest of the defense's output on the attacked image")


class RowRecord(BaseModel):
    """The ``record`` column: how the row's output was produced."""

    model_config = _RECORD
    victim: VictimInfo = Field(default_factory=VictimInfo)
    attack: AttackInfo = Field(default_factory=AttackInfo)
    threat: ThreatInfo = Field(default_factory=ThreatInfo)
    perturbation: Perturbation = Field(default_factory=Perturbation)
    defense: DefenseInfo = Field(default_factory=DefenseInfo)
    generate_seconds_per_sample: float | None = Field(None, description="wall time of generation per sample")
    draw_outputs: list[str] | None = Field(None, description="N-draw rows: the output of every purification draw, "
                                                             "the first being `output`")
    reference_attacked: str = Field("", description="the reference text the attack's loss used")
    attack_cost: AttackCost | None = Field(None, description="what making this row's adversarial example cost "
                                                             "(its batch's totals), computed or reused")
    victim_fingerprint: str = Field("", description="hash of the victim's weights and configuration")
    seed: int | None = Field(None, description="the suite's seed")
    images: RowImages | None = Field(None, description="for the first samples of a cell: the board's example images")

    def as_json(self) -> dict[str, Any]:
        """What the store writes: every field, null where it does not apply."""
        return self.model_dump(mode="json")


class ResultRow(BaseModel):
    """One row of the store's ``results`` table."""

    model_config = ConfigDict(frozen=True)
    fingerprint: str = Field(description="sha256 of everything that produced the row: schema version, victim weights "
                                         "and params, task spec, sample id and input hash, attack, threat, defense, "
                                         "seed, and each plugin's code version")
    run_id: str = Field(description="the run that computed it (a resumed run reuses rows, never rewrites them)")
    suite: str
    victim: str
    task: str = Field(description="the task's label: name:split, or its id")
    metric: str = Field(description="the task's headline metric (vqa_accuracy in [0,1]; cider x100)")
    attack: str = Field(description="the attack's label (its id or name; protocol cells: adaptive@THREAT, ...)")
    threat: str = Field(description="the threat model's name ('clean' for the unattacked condition)")
    norm: str
    eps: float
    defense: str = Field(description="the defense's label (its id or name)")
    sample_id: str = Field(description="VQA question id / COCO image id")
    output: str = Field(description="the victim's generated text (the first draw's, for N-draw rows)")
    adversarial_key: str | None = Field(None, description="key into `adversarial` (null for clean rows)")
    scores: dict[str, float | list[float]] | None = Field(
        None, description="every per-sample score, set once the cell is complete (N-draw rows: also each draw's)")
    headline: float | None = Field(None, description="this sample's value of `metric`")
    record: RowRecord = Field(default_factory=RowRecord)


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is not None:
        return f"{origin.__name__} of {' to '.join(_type_text(a) for a in args)}"
    return "any" if annotation is Any else annotation.__name__


def _fields_table(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            lines.extend(_fields_table(nested[0], f"{prefix}{name}."))
            continue
        lines.append(f"| `{prefix}{name}` | {_type_text(annotation)} | {info.description or ''} |")
    return lines


def record_fields_markdown() -> str:
    """The ``record`` column's fields, as docs/results-schema.md shows them."""
    return "\n".join(["| field | type | meaning |", "|---|---|---|", *_fields_table(RowRecord)])


if __name__ == "__main__":
    print(record_fields_markdown())
