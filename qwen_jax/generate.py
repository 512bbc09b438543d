"""`python -m qwen_jax.generate`: the command line of qwen_jax.infer.generate."""

import sys

from qwen_jax.infer.generate import main

if __name__ == "__main__":
    sys.exit(main())
