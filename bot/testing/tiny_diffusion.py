"""A tiny Stable Diffusion pipeline built locally in seconds (no download).

`build_tiny_diffusion(path)` assembles an untrained UNet, VAE and CLIP text
encoder from small configs, a byte-level CLIP tokenizer made in memory and a
DDIM scheduler, and saves them with `save_pretrained`, so `[draw] model =
"<path>"` loads it through the real engine exactly like a real checkpoint.
The pictures are coloured noise, but they are real PNGs, deterministic by
seed, and a 64x64, 2-step draw takes well under a second on a CPU:

    python -m bot.testing.tiny_diffusion models/tiny-sd
    AIGC_BOT__DRAW__MODEL=models/tiny-sd AIGC_BOT__DRAW__DEFAULT_STEPS=2 \
    AIGC_BOT__DRAW__DEFAULT_WIDTH=64 AIGC_BOT__DRAW__DEFAULT_HEIGHT=64 aigc-bot chat
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: Settings that suit the tiny pipeline (pass as `[draw]` overrides).
TINY_DRAW_SETTINGS: dict[str, Any] = {
    "default_steps": 2,
    "max_steps": 4,
    "default_width": 64,
    "default_height": 64,
    "max_width": 128,
    "max_height": 128,
}

_MAX_TOKENS = 32
_WORDS = ["a", "the", "cat", "dog", "red", "blue", "house", "tree", "sky", "sun", "painting"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = 256 + extra
            extra += 1
    return [chr(table[byte]) for byte in range(256)]


def build_tiny_tokenizer() -> Any:
    """A CLIP tokenizer whose vocabulary is every byte (alone and word-final)
    plus a few whole words, built in memory from a dict and a merge list."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _bytes_to_unicode():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge left to right: c+a -> ca, ca+t</w> -> cat</w>.
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # pairs are what it takes
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=_MAX_TOKENS,
    )


def build_tiny_diffusion(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (no safety checker) under `path`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)  # type: ignore[attr-defined]
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bot.testing.tiny_diffusion DIRECTORY", file=sys.stderr)
        return 2
    print(build_tiny_diffusion(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
