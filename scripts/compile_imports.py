"""Byte-compile what a run imports, once, at set-up (called by scripts/bootstrap.sh).

The environment may set PYTHONDONTWRITEBYTECODE (these machines do), and the bootstrap installs
with ``pip --no-compile`` (compiling all 1.6 GB of site-packages costs ~50 s). Without ``.pyc``
files every Python process (the CLI, each worker, each test subprocess) compiles torch,
transformers and the rest from source: ~6 s more per process on 2 cores. Importing here, with
bytecode writing switched on, compiles exactly the modules runs use; later processes read them.
"""

from __future__ import annotations

import importlib
import sys

sys.dont_write_bytecode = False

# imported lazily inside the plugins, by model and task code (the kernel half imports the CLI
# and every built-in plugin through get_plugins)
MODULES = (
    "transformers.models.vit.modeling_vit",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder",
    "transformers.models.blip.modeling_blip",
    "transformers.models.blip_2.modeling_blip_2",
    "transformers.models.llava.modeling_llava",
    "transformers.models.clip.modeling_clip",
    "transformers.tokenization_utils_fast",
    "transformers.generation.utils",
    "diffusers.models.unets.unet_2d",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.schedulers.scheduling_ddim",
    "peft",
    "peft.tuners.lora",
    "safetensors.torch",
    "tokenizers",
    "matplotlib.pyplot",
    "pycocoevalcap.bleu.bleu",
    "pycocoevalcap.cider.cider",
    "pycocoevalcap.meteor.meteor",
    "pycocoevalcap.rouge.rouge",
    "pycocoevalcap.tokenizer.ptbtokenizer",
    "ray",
    "psutil",
    "pytest",
)


def main(argv: list[str]) -> int:
    """``compile_imports.py [kernel|libraries]``: one half (the bootstrap runs both halves side by
    side, one per core), or everything."""
    part = argv[0] if argv else "all"
    if part in ("kernel", "all"):
        import codefend.cli  # noqa: F401 - the command line every run starts from
        from harness.plugins import get_plugins

        get_plugins()
    missing = []
    for name in MODULES if part != "kernel" else ():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional package; the run that needs it says so
            missing.append(f"{name} ({type(exc).__name__})")
    if missing:
        print(f"note: not byte-compiled (not importable here): {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
