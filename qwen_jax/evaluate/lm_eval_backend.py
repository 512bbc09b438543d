"""The lm-evaluation-harness (0.4.x) backend `qwen_jax`:

    lm_eval --model qwen_jax --model_args checkpoint=DIR[,mesh=1:-1:1,dtype=float32,...] \\
        --tasks mmlu
    lm_eval.simple_evaluate(model=QwenJaxLM(checkpoint=DIR), tasks=[...])

The name is registered when lm_eval's registry is imported (qwen_jax_lm_eval.pth, installed
with the project), so the stock `lm_eval` command finds it.

Model arguments: checkpoint (an import, a training workdir or one of its steps, a LoRA run),
dtype, mesh (data:fsdp:tensor, -1 = fill; default 1:-1:1), max_length (default the model's
seq_length), batch_tokens (tokens per scoring batch, default 16384), max_batch_size (rows,
default 64), generation_batch_size (default 16), seed; for several processes
coordinator_address, num_processes, process_id (or what jax.distributed detects).

Every process of a multi-process run evaluates every request (lm-eval sees one rank) and
returns the same results.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  lm-eval's own models, registered before ours
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, \
    postprocess_generated_text
from tqdm import tqdm

from qwen_jax.data import chat_format
from qwen_jax.evaluate.engine import Engine, EvalError, GenerationRequest


@register_model("qwen_jax")
class QwenJaxLM(TemplateLM):
    """lm-eval's `TemplateLM` on our engine: context and continuation are encoded together and
    split as TemplateLM does; an empty context starts from <|endoftext|>."""

    def __init__(self, checkpoint=None, dtype: str | None = None, mesh="1:-1:1",
                 max_length: int | None = None, batch_tokens: int = 16384,
                 max_batch_size: int | None = None, generation_batch_size: int = 16,
                 max_gen_toks: int = 256, seed: int = 0, coordinator_address: str | None = None,
                 num_processes: int | None = None, process_id: int | None = None,
                 batch_size=None, device=None, **unused):
        super().__init__()
        if unused:
            raise EvalError(f"unknown model argument(s) {sorted(unused)}: expected checkpoint, "
                            "dtype, mesh, max_length, batch_tokens, max_batch_size, "
                            "generation_batch_size, max_gen_toks, seed, coordinator_address, "
                            "num_processes, process_id")
        if not checkpoint:
            raise EvalError("model argument checkpoint=DIR is required")
        from qwen_jax.train.processes import initialize_distributed

        if coordinator_address is not None or num_processes is not None:
            initialize_distributed(coordinator_address, _int(num_processes),
                                   _int(process_id))
        rows = max_batch_size
        if rows is None and batch_size not in (None, "auto") and str(batch_size).isdigit():
            rows = int(batch_size)  # lm_eval --batch_size N: at most N rows a batch
        self.engine = Engine(checkpoint, dtype=dtype, mesh=mesh,
                             max_length=_int(max_length), batch_tokens=int(batch_tokens),
                             max_batch_size=int(rows or 64),
                             generation_batch_size=int(generation_batch_size), seed=int(seed))
        self.tokenizer = self.engine.tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self._rank, self._world_size = 0, 1
        self._device = "jax"

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        # special-token text is the token itself, as in transformers' tokenizers (a chat
        # template's <|im_start|>)
        return self.tokenizer.encode(string, allow_special=True)

    def tok_decode(self, tokens) -> str:
        return self.engine.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "chatml"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """ChatML as the release's make_context lays it out; without a system turn, the
        release's default system message."""
        turns = list(chat_history)
        if not turns or turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": chat_format.DEFAULT_SYSTEM})
        text = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        else:  # the last (assistant) turn is continued
            text = text[:-len("<|im_end|>\n")]
        return text

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm or not self._primary(),
                  desc="qwen_jax loglikelihood") as bar:
            results = self.engine.loglikelihood(pairs, progress=bar.update)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id])
        asked, stops = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            top_k = int(kwargs.pop("top_k", 0) or 0)
            if max_new >= self.max_length:
                raise EvalError(f"max_gen_toks={max_new} must be below max_length="
                                f"{self.max_length}")
            chat = context.endswith("<|im_start|>assistant\n")  # a turn ends at <|im_end|>
            asked.append(GenerationRequest(
                self.tok_encode(context), tuple(until), max_new, do_sample and temperature > 0,
                temperature if temperature > 0 else 1.0, top_p, top_k,
                (self.tokenizer.im_end_id,) if chat else ()))
            stops.append(until)
        with tqdm(total=len(asked), disable=disable_tqdm or not self._primary(),
                  desc="qwen_jax generate_until") as bar:
            texts = self.engine.generate(asked, progress=bar.update)
        out = []
        for req, text, until in zip(requests, texts, stops):
            text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    @staticmethod
    def _primary() -> bool:
        import jax

        return jax.process_index() == 0


def _int(value):
    return None if value in (None, "", "None") else int(value)
