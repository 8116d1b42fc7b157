"""Built-in attacks, registered like any third-party plugin (by import path: a module is imported
when one of its attacks is first used)."""

from harness.hookspecs import hookimpl
from harness.plugins import register_from


@hookimpl
def register_attacks(register):
    # one module at a time: one that cannot be imported (ART missing, say) takes only its own attacks
    register_from(register, "attacks.clean", [("none", "NoAttack", "no attack: the clean score")])
    register_from(register, "attacks.pgd", [
        ("pgd", "PGD", "projected gradient descent (L∞/L2, random start) on the victim's loss")])
    register_from(register, "attacks.apgd", [
        ("apgd", "APGD", "Auto-PGD (Croce & Hein 2020) on the victim's loss; untargeted or targeted")])
    register_from(register, "attacks.ensemble", [
        ("ensemble", "Ensemble", "per-sample worst case over member attacks and references (RobustVLM)")])
    register_from(register, "attacks.art_attacks", [
        ("art-pgd", "ARTPGD", "ART ProjectedGradientDescent through an image-to-text estimator"),
        ("art-fgsm", "ARTFGSM", "ART FastGradientMethod through an image-to-text estimator"),
        ("art-square", "ARTSquare", "ART SquareAttack (query-only) with a text loss and success check"),
    ], requires=("art",))
    register_from(register, "attacks.transfer", [
        ("mf-ii", "MFii", "AttackVLM MF-ii: transfer via a surrogate's image embedding of a target image"),
        ("mf-tt", "MFtt", "AttackVLM MF-tt: query-only random gradient-free text matching"),
    ])
    register_from(register, "attacks.typographic", [
        ("typographic", "Typographic", "text drawn into the image (unbounded, no gradients)")])
