"""`aigc-bot bench`: how fast the bot serves many people, measured side by side.

* `serving` — the default run: the real path (manager + SQLite store + the
  local engine) against one `model.generate` per message, then the manager +
  storage overhead with an instant engine, and int8 against fp32;
* `compare` — `--peers`: ours against the engines a user would pick instead
  (transformers' static batches, CTranslate2 float32 and int8), in lockstep
  rounds and with closed-loop users (`peers`, `peer_run`), and the bot's
  memory at that load (`memory`);
* `report` — the table and the plots; `command` — the subcommand itself.

See docs/PERFORMANCE.md.
"""

from bot.bench.command import add_subcommand
from bot.bench.plan import Plan
from bot.bench.serving import run_bench

__all__ = ["Plan", "add_subcommand", "run_bench"]
