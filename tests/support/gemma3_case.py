"""A tiny Gemma 3 VLM from config with its real ``Gemma3Processor`` (pan-and-scan off), shared by the layout and
profile tests (``tests/profiles/test_layouts_gemma3.py``) and the adapter's (``tests/serving/test_sliding_windows.py``).
The text tower's layers 0 and 2 slide over a window of 8 tokens, 1 and 3 attend in full."""

from __future__ import annotations

import torch

BOI, EOI, IMAGE = 320, 321, 322  # <start_of_image>, <end_of_image>, <image_soft_token>
GEMMA_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
FULL_LAYERS = [1, 3]
#: (tower image_size px, patch px, mm_tokens_per_image): 12 patches pooled 3x3 to 4x4 tokens (like 896 px: 64 patches
#: pooled 4x4 to 16x16), and 10 patches pooled 3x3 to 3x3 tokens (pooling drops the last patch row and column)
GEOMETRIES = {"even": (48, 4, 16), "cropped": (40, 4, 9)}


def gemma3_tokenizer():
    """The tiny word-level vocabulary plus Gemma 3's image tokens, named as its tokenizer config names them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {GEMMA_TOKENS["boi_token"]: BOI, GEMMA_TOKENS["eoi_token"]: EOI, GEMMA_TOKENS["image_token"]: IMAGE}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 300)}, **specials}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", *specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>", padding_side="left",
                                   extra_special_tokens=GEMMA_TOKENS)  # fmt: skip


def gemma3_processor(geometry: str = "even", **image_settings):
    """The real ``Gemma3Processor`` around the PIL image processor squashing to the tower's square."""
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    side, _, tokens = GEOMETRIES[geometry]
    ip = Gemma3ImageProcessorPil(size={"height": side, "width": side}, **image_settings)
    return tf.Gemma3Processor(image_processor=ip, tokenizer=gemma3_tokenizer(), image_seq_length=tokens)


def gemma3_model(geometry: str = "even", init_range: float = 0.02):
    """A tiny random Gemma 3 VLM from config (SigLIP tower, four text layers, two of them sliding), eval mode."""
    import transformers as tf

    image_size, patch, tokens = GEOMETRIES[geometry]
    text = tf.Gemma3TextConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               layer_types=list(LAYER_TYPES), sliding_window=8, max_position_embeddings=512,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=image_size, patch_size=patch)  # fmt: skip
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                             image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)  # fmt: skip
    config.get_text_config().initializer_range = config.initializer_range = init_range
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.Gemma3ForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    model.generation_config.bos_token_id = 1
    return model.eval()
