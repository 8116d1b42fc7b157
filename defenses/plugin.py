"""Built-in defenses, registered like any third-party plugin (by import path)."""

from harness.hookspecs import hookimpl
from harness.plugins import register_from


@hookimpl
def register_defenses(register):
    # one module at a time: one that cannot be imported (diffusers missing, say) takes only its own defenses
    register_from(register, "defenses.basic", [
        ("none", "NoDefense", "no defense"),
        ("jpeg", "JpegDefense", "JPEG re-compression (not differentiable: BPDA identity)"),
    ])
    register_from(register, "defenses.diffpure", [
        ("diffpure", "DiffPure", "DiffPure (Nie et al. 2022): diffuse to t*, reverse (sde/ddpm/ddim); exact gradients, EOT")],
        requires=("diffusers",))
    register_from(register, "defenses.purifier", [
        ("codefend-purifier", "CoDefendPurifier",
         "CoDefend's supervised purifier: DDIM from t* with a denoiser fine-tuned on (adversarial, clean) pairs; "
         "objective 'unsupervised' is the fair control")], requires=("diffusers",))
    register_from(register, "defenses.prompt", [
        ("codefend-prompt", "CoDefendPrompt",
         "CoDefend's prompt optimisation: searched defensive prefix (any victim) or trained soft prompt (white-box)")])
    register_from(register, "defenses.codefend", [
        ("codefend", "CoDefend", "CoDefend: supervised purifier + optimised prompt")], requires=("diffusers",))
