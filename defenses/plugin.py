"""Built-in defenses, registered like any third-party plugin."""

from defenses.basic import JpegDefense, NoDefense
from defenses.codefend import CoDefend
from defenses.diffpure import DiffPure
from defenses.prompt import CoDefendPrompt
from defenses.purifier import CoDefendPurifier
from harness.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    register("none", NoDefense, description="no defense")
    register("jpeg", JpegDefense, description="JPEG re-compression (not differentiable: BPDA identity)")
    register("diffpure", DiffPure, description="DiffPure (Nie et al. 2022): diffuse to t*, reverse (sde/ddpm/ddim); exact gradients, EOT")
    register("codefend-purifier", CoDefendPurifier,
             description="CoDefend's supervised purifier: DDIM from t* with a denoiser fine-tuned on (adversarial, clean) pairs; objective 'unsupervised' is the fair control")
    register("codefend-prompt", CoDefendPrompt,
             description="CoDefend's prompt optimisation: searched defensive prefix (any victim) or trained soft prompt (white-box)")
    register("codefend", CoDefend, description="CoDefend: supervised purifier + optimised prompt")
