"""Seen vs unseen: is a row's attack one that the defense trained on?

A kernel module: it reads only :mod:`harness.contracts` (no attack, defense or task package), so the
runner, boards and third-party tools can label rows the same way.

The rule (:func:`training_label`): an attack is

- ``"seen"`` when its plugin name, its *defining* parameters (:attr:`Attack.defining_params`), its
  norm and its ε all match one of the defense's :class:`~harness.contracts.TrainingAttack` s;
- ``"seen-attack-unseen-eps"`` when plugin, defining parameters and norm match one, but no ε does;
- ``"unseen"`` otherwise (another plugin, another target, another norm).

Budget parameters (steps, step sizes, restarts) are not defining, so PGD with 10 steps at the
training ε is seen by a defense trained on PGD with 20. A :class:`~harness.contracts.CompositeAttack`
(``ensemble``) gets the strongest label of its members (seen > seen-attack-unseen-eps > unseen),
each member labelled in the composite's threat model. Training attacks are never composites (the
pair makers cannot run an ensemble), so a training attack is matched as one plugin.

Defining parameters are compared on a normalised view of the *parameters as written* (the suite's
``params`` of the row's attack, the training attack's ``params``): a parameter that is not written
takes the plugin's default (read from the signature of the attack instance's ``__init__``; None for
a required parameter), and strings are compared with surrounding white space stripped (the plugins
strip target texts). Instance attributes are not read, since plugins store parameters under other
names (APGD keeps ``target`` as ``target_text``).

Attacks that ignore the threat model (``uses_threat`` False: ``typographic``) make the same images
at every ε and norm, so for them only plugin and defining parameters are compared: they are ``seen``
or ``unseen``, never ``seen-attack-unseen-eps``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal, Mapping, Sequence

from harness.contracts import Attack, CompositeAttack, ThreatModel, TrainingAttack

Label = Literal["seen", "seen-attack-unseen-eps", "unseen"]
LABELS: tuple[Label, ...] = ("unseen", "seen-attack-unseen-eps", "seen")
"""The labels, weakest first (a composite takes the strongest of its members')."""

EPS_REL_TOLERANCE = 1e-9
"""Two radii are the same ε when they agree to this relative tolerance (8/255 written two ways)."""


def training_label(
    attack_name: str,
    attack_params: Mapping[str, Any],
    attack: Attack,
    threat: ThreatModel,
    training: Sequence[TrainingAttack],
) -> Label:
    """Label a row's attack against a defense's ``training`` attacks (see the module docstring).

    ``attack_name`` is the attack's plugin name, ``attack_params`` its parameters as the suite
    wrote them, ``attack`` the created instance (its class declares ``defining_params``; a
    :class:`CompositeAttack` lists its members), ``threat`` the row's threat model.
    """
    if isinstance(attack, CompositeAttack):
        labels = [training_label(name, params, member, threat, training) for name, params, member in attack.member_attacks()]
        return max(labels, key=LABELS.index, default="unseen")
    label: Label = "unseen"
    for trained in training:
        if trained.name != attack_name or not _same_defining_params(attack, attack_params, trained.params):
            continue
        if not attack.uses_threat:
            return "seen"
        if trained.norm != threat.norm:
            continue
        if math.isclose(float(trained.eps), float(threat.eps), rel_tol=EPS_REL_TOLERANCE, abs_tol=0.0):
            return "seen"
        label = "seen-attack-unseen-eps"
    return label


def defining_view(attack: Attack, params: Mapping[str, Any]) -> dict[str, Any]:
    """The defining parameters of ``attack``'s plugin in ``params``, defaults filled, normalised."""
    defaults = _defaults(type(attack))
    return {key: _normalise(params[key] if key in params else defaults.get(key)) for key in attack.defining_params}


def _same_defining_params(attack: Attack, params: Mapping[str, Any], trained: Mapping[str, Any]) -> bool:
    return defining_view(attack, params) == defining_view(attack, trained)


def _defaults(cls: type) -> dict[str, Any]:
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    return {
        name: (None if p.default is inspect.Parameter.empty else p.default)
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _normalise(v)) for k, v in value.items()))
    return value
