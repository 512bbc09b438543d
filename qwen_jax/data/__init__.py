"""Text to batches: the tokenizer (tiktoken Qwen vocabulary, byte-level fallback), the ChatML
format with loss masks, document sources, and the grain pipelines that pack them."""
