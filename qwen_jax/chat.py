"""`python -m qwen_jax.chat`: the command line of qwen_jax.infer.chat."""

import sys

from qwen_jax.infer.chat import main

if __name__ == "__main__":
    sys.exit(main())
