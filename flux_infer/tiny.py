"""A tiny FLUX.1-dev-shaped pipeline with random weights, for tests and smoke runs.

It has FLUX.1-dev's topology (guidance-embedding transformer on 2x2-packed 16-channel latents,
an 8x AutoencoderKL, CLIP and T5 text encoders) at a width that runs 1024x1024 at 28 steps in
seconds on a CPU. It is saved in diffusers' folder format and loads through the same code as the
real weights. Everything is built offline, tokenizers included.
"""

from __future__ import annotations

import string
from pathlib import Path

# Changes whenever the pipeline below changes: `--model tiny`'s cache folder is named after it, so a
# pipeline made by an older version is not taken for this one.
VERSION = 2

# Printable ASCII: every byte of an English prompt has a token, so nothing maps to <unk>.
_CHARS = string.ascii_letters + string.digits + string.punctuation


def clip_tokenizer():
    """CLIP's tokenizer over single bytes, made offline (ids below CLIP-L's vocabulary size)."""
    from transformers import CLIPTokenizer

    from tokenizers.pre_tokenizers import ByteLevel

    # Byte-level BPE over single characters, with and without the end-of-word mark.
    byte_chars = sorted(ByteLevel.alphabet())
    vocab = {}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    for ch in byte_chars:
        vocab[ch + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    # FluxPipeline uses model_max_length as CLIP's sequence length: CLIP-L's is 77.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """T5's tokenizer over single characters, made offline (ids below T5-XXL's vocabulary size)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(ch, -2.0) for ch in _CHARS]
    pieces += [("\u2581" + ch, -1.5) for ch in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny pipeline in memory, weights drawn from `seed`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_infer.random_weights import SCHEDULER

    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    text_width = 32

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_width,
        pooled_projection_dim=text_width,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),  # four levels: 8x downsampling, as FLUX's VAE
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        # No attention in the middle block: over a 1024x1024 image's 16384 latent positions it took
        # most of the tiny pipeline's time (FLUX's VAE has it; its place in the graph is not at issue here).
        mid_block_add_attention=False,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip),
            hidden_size=text_width,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=text_width,
            bos_token_id=clip.bos_token_id,
            eos_token_id=clip.eos_token_id,
            pad_token_id=clip.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5),
            d_model=text_width,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            is_encoder_decoder=False,
            pad_token_id=t5.pad_token_id,
            eos_token_id=t5.eos_token_id,
            decoder_start_token_id=t5.pad_token_id,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)  # FLUX.1-dev's
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5,
        transformer=transformer,
    )


def make_tiny(directory: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny pipeline to `directory` in diffusers' format (safetensors) and return it."""
    directory = Path(directory)
    pipeline = build_tiny_pipeline(seed=seed)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_taef1(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random AutoencoderTiny shaped like TAEF1 (16 latent channels, 8x) to `directory`."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        latent_channels=16,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    directory = Path(directory)
    vae.save_pretrained(directory, safe_serialization=True)
    return directory
