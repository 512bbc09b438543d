"""Train a Qwen v1 model: `python train.py --config configs/<name>.py --workdir DIR
[--config.<key>=<value> ...]`.

Resumes automatically from the latest complete checkpoint in DIR/checkpoints. SIGTERM
(preemption) saves a checkpoint and exits cleanly. See configs/base.py for the keys.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    from qwen_jax import train_loop

    train_loop.maybe_initialize_distributed()
    config = _CONFIG.value
    try:
        train_loop.train(config, _WORKDIR.value, config_json=config.to_json_best_effort())
    except train_loop.TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def parse_flags(argv):
    """absl's parser, with config-override mistakes (unknown key, wrong type) reported as one
    line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        key = str(e).strip("'\"")
        arg = next((a for a in argv if a.startswith("--config.") and key in a), key)
        print(f"error: unknown config key {key!r} in {arg} (configs/base.py lists the keys)",
              file=sys.stderr)
    except (flags.Error, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
