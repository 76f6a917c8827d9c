"""`aigc-bot train` and `aigc-bot eval` (registered by bot/cli.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DATA_HELP = (
    "'chitchat' (the bundled Chit Chat Challenge corpus, default) or a JSONL file with one "
    'dialogue per line: {"turns": ["hi", "hello! how are you?", ...]}, speakers alternating'
)


def add_subcommands(sub: Any) -> None:
    from bot.training.trainer import TrainOptions

    d = TrainOptions()
    train = sub.add_parser(
        "train",
        help="train or fine-tune a GPT-2 dialogue model (the engine's turn format)",
        description="Train a GPT-2 dialogue model from scratch (with its own byte-level BPE) "
        "or fine-tune --base. Turns are joined by EOS exactly as the text engine prompts. "
        "The best model by held-out loss is saved to --output; re-running with the same "
        "--output resumes from its checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--data", default=d.data, help=DATA_HELP)
    train.add_argument(
        "--output", default=d.output, help="model directory to write (text.model points here)"
    )
    train.add_argument(
        "--base",
        default=None,
        help="fine-tune this model directory or hub id instead of training from scratch",
    )
    train.add_argument(
        "--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary (from scratch)"
    )
    train.add_argument(
        "--block-size", type=int, default=d.block_size, help="context length in tokens"
    )
    train.add_argument(
        "--n-layer", type=int, default=d.n_layer, help="transformer layers (from scratch)"
    )
    train.add_argument("--n-embd", type=int, default=d.n_embd, help="hidden size (from scratch)")
    train.add_argument(
        "--n-head", type=int, default=d.n_head, help="attention heads (from scratch)"
    )
    train.add_argument("--dropout", type=float, default=d.dropout, help="dropout (from scratch)")
    train.add_argument(
        "--epochs", type=float, default=d.epochs, help="passes over the training split"
    )
    train.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="stop after this many steps (0: use --epochs)",
    )
    train.add_argument(
        "--max-minutes",
        type=float,
        default=d.max_minutes,
        help="stop after this much training time (0: no limit)",
    )
    train.add_argument(
        "--batch-tokens",
        type=int,
        default=d.batch_tokens,
        help="tokens per batch, padding included",
    )
    train.add_argument(
        "--lr", type=float, default=d.lr, help="peak learning rate (use ~5e-5 with --base)"
    )
    train.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps"
    )
    train.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay"
    )
    train.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="dialogues held out for validation",
    )
    train.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations"
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between checkpoints (also every 10 minutes)",
    )
    train.add_argument(
        "--loss-on",
        choices=["all", "bot"],
        default=d.loss_on,
        help="take the loss on every turn, or on the replies (turns 2, 4, ...) only",
    )
    train.add_argument(
        "--seed", type=int, default=d.seed, help="seed for the split, shuffling and initialization"
    )
    train.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=d.device,
        help="auto: CUDA (mixed precision) when available",
    )
    train.add_argument(
        "--threads", type=int, default=d.threads, help="CPU threads (0: torch's default)"
    )
    train.add_argument(
        "--fresh",
        action="store_true",
        help="ignore an existing checkpoint in --output and start over",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval",
        help="perplexity of a model on held-out dialogues",
        description="Perplexity per token of a model on dialogues in the engine's turn format. "
        "With --data chitchat it scores the same held-out split `aigc-bot train` used (same "
        "--val-fraction and --seed); with a JSONL file it scores the whole file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--model", default="models/chitchat-gpt2", help="model directory or hub id")
    ev.add_argument("--data", default="chitchat", help=DATA_HELP)
    ev.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="with --data chitchat: the held-out fraction; unset: the one in the model's "
        f"training.json, else {d.val_fraction}",
    )
    ev.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"with --data chitchat: the split's seed; unset: training.json's, else {d.seed}",
    )
    ev.add_argument("--block-size", type=int, default=0, help="context length (0: the model's)")
    ev.add_argument(
        "--loss-on",
        choices=["all", "bot"],
        default="all",
        help="score every turn or the replies only",
    )
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    ev.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from bot.training.trainer import TrainOptions, train

    options = TrainOptions(
        data=args.data,
        output=args.output,
        base=args.base,
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        dropout=args.dropout,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        loss_on=args.loss_on,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        fresh=args.fresh,
        progress=not args.no_progress,
        command=["aigc-bot", *sys.argv[1:]] if sys.argv and "aigc-bot" in sys.argv[0] else [],
    )
    result = train(options)
    ppl = f", held-out perplexity {result.val_perplexity:.2f}" if result.val_perplexity else ""
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint in {result.output}/checkpoint{ppl}")
        return 130
    print(f"saved {result.output} after {result.step} steps in {result.seconds / 60:.1f} min{ppl}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bot.engines.loading import resolve_device
    from bot.training import data as data_mod
    from bot.training.evaluate import dialogue_nll, perplexity
    from bot.training.pieces import load_pretrained, positions

    dialogues = data_mod.load_dialogues(args.data)
    if args.data == data_mod.CHITCHAT:
        fraction, seed = _training_split(args.model)
        fraction = fraction if args.val_fraction is None else args.val_fraction
        seed = seed if args.seed is None else args.seed
        _, dialogues = data_mod.split(dialogues, fraction, seed)
        what = (
            f"chitchat held-out split ({len(dialogues)} dialogues, "
            f"val-fraction {fraction:g}, seed {seed})"
        )
    else:
        what = f"{args.data} ({len(dialogues)} dialogues)"
    device = resolve_device(args.device)
    model, tokenizer = load_pretrained(args.model, "--model")
    model.to(device)
    block = min(args.block_size or positions(model), positions(model))
    examples = data_mod.encode_dialogues(
        tokenizer, dialogues, block, bot_only=args.loss_on == "bot"
    )
    nll, count = dialogue_nll(model, examples, device, args.batch_tokens)
    print(
        f"{args.model} on {what}: {count} tokens, loss {nll / count:.4f}, "
        f"perplexity {perplexity(nll, count):.2f}"
    )
    return 0


def _training_split(model: str) -> tuple[float, int]:
    """The held-out split a model was trained with (its training.json), so
    `eval --data chitchat` scores exactly the dialogues it never saw."""
    import json
    from pathlib import Path

    from bot.training.trainer import TrainOptions

    defaults = TrainOptions()
    fraction, seed = defaults.val_fraction, defaults.seed
    summary = Path(model) / "training.json"
    if summary.is_file():
        try:
            options = json.loads(summary.read_text(encoding="utf-8")).get("options", {})
            if options.get("data") == "chitchat":
                fraction = float(options.get("val_fraction", fraction))
                seed = int(options.get("seed", seed))
        except (ValueError, TypeError, AttributeError):
            pass
    return fraction, seed
