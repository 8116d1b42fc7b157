"""Built-in attacks, registered like any third-party plugin."""

from harness.hookspecs import hookimpl


@hookimpl
def register_attacks(register):
    # Imported here so that one attack module failing to import (ART missing, say) is reported by
    # the plugin loader without taking the registry down with it.
    from attacks.apgd import APGD
    from attacks.art_attacks import ARTFGSM, ARTPGD, ARTSquare
    from attacks.clean import NoAttack
    from attacks.ensemble import Ensemble
    from attacks.pgd import PGD
    from attacks.transfer import MFii, MFtt
    from attacks.typographic import Typographic

    register("none", NoAttack, description="no attack: the clean score")
    register("pgd", PGD, description="projected gradient descent (L∞/L2, random start) on the victim's loss")
    register("apgd", APGD, description="Auto-PGD (Croce & Hein 2020) on the victim's loss; untargeted or targeted")
    register("ensemble", Ensemble, description="per-sample worst case over member attacks and references (RobustVLM)")
    register("art-pgd", ARTPGD, description="ART ProjectedGradientDescent through an image-to-text estimator")
    register("art-fgsm", ARTFGSM, description="ART FastGradientMethod through an image-to-text estimator")
    register("art-square", ARTSquare, description="ART SquareAttack (query-only) with a text loss and success check")
    register("mf-ii", MFii, description="AttackVLM MF-ii: transfer via a surrogate's image embedding of a target image")
    register("mf-tt", MFtt, description="AttackVLM MF-tt: query-only random gradient-free text matching")
    register("typographic", Typographic, description="text drawn into the image (unbounded, no gradients)")
