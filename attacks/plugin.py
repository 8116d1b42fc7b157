"""Built-in attacks, registered like any third-party plugin."""

from attacks.clean import NoAttack
from attacks.ensemble import Ensemble
from attacks.pgd import PGD
from harness.hookspecs import hookimpl


@hookimpl
def register_attacks(register):
    register("none", NoAttack, description="no attack: the clean score")
    register("pgd", PGD, description="projected gradient descent (L∞/L2, random start) on the victim's loss")
    register("ensemble", Ensemble, description="per-sample worst case over member attacks and references (RobustVLM)")
