"""`aigc-bot train` and `aigc-bot eval`: GPT-2 dialogue models in the engine's turn format.

Heavy imports (torch, transformers, tokenizers) happen inside functions so that
`aigc-bot --help` stays fast.
"""
