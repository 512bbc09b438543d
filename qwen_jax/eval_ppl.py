"""`python -m qwen_jax.eval_ppl`: the command line of qwen_jax.infer.eval_ppl."""

import sys

from qwen_jax.infer.eval_ppl import main

if __name__ == "__main__":
    sys.exit(main())
