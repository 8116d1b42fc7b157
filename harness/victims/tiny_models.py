"""Tiny multimodal models built from configs (random weights, offline tokenizers), saved in the
real checkpoint layout: the tests and scripts/gpu_smoke.sh load them through the same
``from_pretrained`` code a real BLIP-2 or LLaVA checkpoint goes through. Not victims to evaluate:
their weights are random.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", ":", "ASSISTANT", "what", "colour", "is", "the",
         "shape", "?", "red", "blue", "a", "circle", "square", "describe", "image", ".", "how", "many", "shapes",
         # LLaVA-1.5's VQA instruction
         "Answer", "question", "using", "single", "word", "or", "phrase."]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT : {% endif %}"
)


def word_tokenizer(words: list[str], *, bos: str, eos: str, image_token: str = "<image>"):
    """A whitespace word-level fast tokenizer over ``words`` (``<unk>``/``<pad>`` among them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos,
                                        eos_token=eos, pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer


def build_tiny_llava(folder: Path, image_size: int = 32) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer(WORDS, bos="<s>", eos="</s>")
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=image_size, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                pad_token_id=3, bos_token_id=1, eos_token_id=2),
        image_token_index=4, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


BLIP2_WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "Question:", "Answer:", "what", "colour", "is", "the",
               "shape", "?", "red", "blue", "a", "circle", "Short", "answer:"]


def build_tiny_blip2(folder: Path) -> Path:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = word_tokenizer(BLIP2_WORDS, bos="</s>", eos="</s>")  # OPT: one token for both
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                          encoder_hidden_size=32, vocab_size=30).to_dict(),
        text_config=OPTConfig(vocab_size=len(BLIP2_WORDS), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                              pad_token_id=3, bos_token_id=2, eos_token_id=2).to_dict(),
        num_query_tokens=4, image_token_index=4,
    )
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.48, 0.46, 0.41],
                                         image_std=[0.27, 0.26, 0.28])
    Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4).save_pretrained(folder)
    return folder


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "what", "colour", "is", "the", "shape", "?",
              "red", "blue", "a", "circle", "picture", "of", "square"]


def build_tiny_blip(folder: Path, head: str = "vqa") -> Path:
    """A tiny BLIP: ``BlipForQuestionAnswering`` (``head="vqa"``) or ``BlipForConditionalGeneration``."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_WORDS)}, do_lower_case=True)
    torch.manual_seed(0)
    ids = {w: i for i, w in enumerate(BLIP_WORDS)}
    config = BlipConfig(
        text_config=BlipTextConfig(vocab_size=len(BLIP_WORDS), hidden_size=32, encoder_hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64, bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"],
                                   pad_token_id=ids["[PAD]"]).to_dict(),
        vision_config=BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8).to_dict(),
    )
    cls = BlipForQuestionAnswering if head == "vqa" else BlipForConditionalGeneration
    cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.48, 0.46, 0.41],
                       image_std=[0.27, 0.26, 0.28]).save_pretrained(folder)
    return folder


def build_tiny_instructblip(folder: Path) -> Path:
    """A tiny InstructBLIP: BLIP-2's parts plus a Q-Former that reads the instruction."""
    from transformers import (
        BertTokenizerFast,
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        OPTConfig,
    )

    torch.manual_seed(0)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8).to_dict(),
        qformer_config=InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, encoder_hidden_size=32,
                                                 vocab_size=len(BLIP_WORDS), pad_token_id=0).to_dict(),
        text_config=OPTConfig(vocab_size=len(BLIP2_WORDS), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                              pad_token_id=3, bos_token_id=2, eos_token_id=2).to_dict(),
        num_query_tokens=4, image_token_index=4,
    )
    InstructBlipForConditionalGeneration(config).save_pretrained(folder)
    InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.48, 0.46, 0.41],
                                           image_std=[0.27, 0.26, 0.28]),
        tokenizer=word_tokenizer(BLIP2_WORDS, bos="</s>", eos="</s>"),
        qformer_tokenizer=BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_WORDS)}),
        num_query_tokens=4,
    ).save_pretrained(folder)
    return folder
