"""Seen vs unseen labels (harness.labels): plugin, defining parameters, norm and ε of the training attacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from attacks.apgd import APGD
from attacks.art_attacks import ARTPGD
from attacks.ensemble import Ensemble, Member
from attacks.pgd import PGD
from attacks.transfer import MFii
from attacks.typographic import Typographic
from harness.contracts import CompositeAttack, Defense, ThreatModel, TrainingAttack
from harness.labels import training_label

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)
LINF4 = ThreatModel("linf-4", "linf", 4 / 255)
L2_8 = ThreatModel("l2-8", "l2", 8 / 255)
TRAIN_PGD = [TrainingAttack("pgd", {"steps": 20}, "linf", 8 / 255)]
TRAIN_APGD = [TrainingAttack("apgd", {"steps": 100}, "linf", 8 / 255)]


def _label(name, params, factory, threat, training):
    return training_label(name, params, factory(**params), threat, training)


def test_same_attack_same_eps_is_seen_whatever_its_budget() -> None:
    assert _label("pgd", {"steps": 20}, PGD, LINF8, TRAIN_PGD) == "seen"
    assert _label("pgd", {"steps": 5, "step_size": 1 / 255}, PGD, LINF8, TRAIN_PGD) == "seen"
    near = ThreatModel("linf-8@", "linf", (8 / 255) * (1 + 1e-12))  # 8/255 computed another way
    assert _label("pgd", {}, PGD, near, TRAIN_PGD) == "seen"


def test_same_attack_at_another_eps_is_its_own_label() -> None:
    assert _label("pgd", {"steps": 20}, PGD, LINF4, TRAIN_PGD) == "seen-attack-unseen-eps"
    # a training attack at the row's ε wins over one at another ε
    both = [TrainingAttack("pgd", {}, "linf", 4 / 255), *TRAIN_PGD]
    assert _label("pgd", {}, PGD, LINF8, both) == "seen"


def test_other_norm_other_plugin_or_no_training_is_unseen() -> None:
    assert _label("pgd", {"steps": 20}, PGD, L2_8, TRAIN_PGD) == "unseen"
    assert _label("apgd", {}, APGD, LINF8, TRAIN_PGD) == "unseen"
    assert _label("pgd", {}, PGD, LINF8, []) == "unseen"


def test_targeted_and_untargeted_apgd_are_different_attacks() -> None:
    assert APGD.defining_params == ("target",) and PGD.defining_params == ()
    assert _label("apgd", {"target": "3"}, APGD, LINF8, TRAIN_APGD) == "unseen"
    assert _label("apgd", {"steps": 10}, APGD, LINF8, TRAIN_APGD) == "seen"
    assert _label("apgd", {"target": None}, APGD, LINF8, TRAIN_APGD) == "seen"  # None is the default
    targeted = [TrainingAttack("apgd", {"target": "3"}, "linf", 8 / 255)]
    assert _label("apgd", {"target": " 3 "}, APGD, LINF8, targeted) == "seen"  # texts compared stripped
    assert _label("apgd", {"target": "3"}, APGD, LINF4, targeted) == "seen-attack-unseen-eps"
    assert _label("apgd", {"target": "4"}, APGD, LINF8, targeted) == "unseen"
    assert _label("apgd", {}, APGD, LINF8, targeted) == "unseen"
    assert _label("art-pgd", {"target": "3"}, ARTPGD, LINF8, [TrainingAttack("art-pgd", {}, "linf", 8 / 255)]) == "unseen"


def test_transfer_targets_define_the_attack() -> None:
    training = [TrainingAttack("mf-ii", {"target_text": "red", "steps": 100}, "linf", 8 / 255)]
    assert _label("mf-ii", {"target_text": "red", "steps": 5}, MFii, LINF8, training) == "seen"
    assert _label("mf-ii", {"target_text": "blue"}, MFii, LINF8, training) == "unseen"


def test_attacks_that_ignore_the_threat_model_compare_plugin_and_text_only() -> None:
    training = [TrainingAttack("typographic", {"text": "cat"}, "linf", 8 / 255)]
    assert _label("typographic", {"text": "cat", "font_size": 12}, Typographic, L2_8, training) == "seen"
    assert _label("typographic", {"text": "dog"}, Typographic, LINF8, training) == "unseen"


def test_an_ensemble_is_seen_when_a_member_is() -> None:
    only = {"members": [Member(name="pgd", params={"steps": 5})]}
    ensemble = Ensemble(**only)
    assert isinstance(ensemble, CompositeAttack)
    [(name, params, member)] = ensemble.member_attacks()
    assert (name, dict(params), type(member)) == ("pgd", {"steps": 5}, PGD)
    assert training_label("ensemble", only, ensemble, LINF8, TRAIN_PGD) == "seen"
    assert training_label("ensemble", only, ensemble, LINF4, TRAIN_PGD) == "seen-attack-unseen-eps"
    mixed = {"members": [Member(name="apgd", params={"steps": 5}), Member(name="pgd", params={"steps": 5})]}
    assert training_label("ensemble", mixed, Ensemble(**mixed), LINF8, TRAIN_PGD) == "seen"
    none = {"members": [Member(name="apgd", params={"steps": 5}), Member(name="apgd", params={"target": "3"})]}
    assert training_label("ensemble", none, Ensemble(**none), LINF8, TRAIN_PGD) == "unseen"
    assert training_label("ensemble", none, Ensemble(**none), LINF8, TRAIN_APGD) == "seen"  # the untargeted member


def test_defenses_declare_what_they_trained_on() -> None:
    from defenses.codefend import CoDefend
    from defenses.prompt import CoDefendPrompt
    from defenses.purifier import CoDefendPurifier

    specs = [{"attack": "pgd", "params": {"steps": 10}, "norm": "linf", "eps": "8/255"}, "apgd@l2-0.5"]
    purifier = CoDefendPurifier(train_attacks=specs)  # constructed only: bind() would train
    assert purifier.training_attacks == [
        TrainingAttack("pgd", {"steps": 10}, "linf", 8 / 255),
        TrainingAttack("apgd", {}, "l2", 0.5),
    ]
    assert purifier.seen_attacks == ["apgd", "pgd"]
    control = CoDefendPurifier(train_attacks=specs, objective="unsupervised")
    assert control.training_attacks == [] and control.seen_attacks == []
    default = CoDefendPurifier()
    assert default.training_attacks == [TrainingAttack("pgd", {"steps": 20}, "linf", 8 / 255)]

    prompt = CoDefendPrompt(train_attacks=["pgd@linf-4/255"])
    assert prompt.training_attacks == [TrainingAttack("pgd", {}, "linf", 4 / 255)]
    full = CoDefend(purifier={"train_attacks": specs}, prompt={"train_attacks": ["pgd@linf-4/255", "apgd@l2-0.5"]})
    assert full.training_attacks == [*purifier.training_attacks, TrainingAttack("pgd", {}, "linf", 4 / 255)]
    assert full.seen_attacks == ["apgd", "pgd"]
    assert Defense().training_attacks == [] and Defense().seen_attacks == []


def test_labels_is_a_kernel_module() -> None:
    code = ("import sys, harness.labels; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('attacks', 'defenses', 'tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
