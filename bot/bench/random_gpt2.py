"""`python -m bot.bench.random_gpt2 DIR`: a randomly initialised GPT-2 124M
(12 layers, 768 wide, 50,257-token vocabulary, 1,024 positions) with the
bundled model's tokenizer, saved to DIR for the GPU bench (no hub download).
Its replies are noise; `bench --peers` forces every reply's length, so the
speed figures are those of the real architecture."""

from __future__ import annotations

import argparse
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "chitchat-gpt2"


def build(path: str | Path, *, tokenizer_dir: str | Path = BUNDLED, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    args = parser.parse_args()
    print(build(args.directory))


if __name__ == "__main__":
    main()
