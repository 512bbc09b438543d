"""FLOP accounting and model FLOP utilisation (MFU).

Forward FLOPs of one sequence of T tokens (a multiply-add counts 2):

    matmuls:   2 T (L (4 H^2 + 3 H F) + H V)            q, k, v, o, gate, up, down, lm_head
    attention: L x 2 x 2 T T_eff H                       scores q.k and the weighted sum p.v

with T_eff the average number of keys a query sees: (T + 1) / 2 for causal attention over T
tokens, min(W, ...) with a window W. The embedding lookup is a gather (no FLOPs) and the
norms, RoPE and softmax are O(T H) and left out, as in the usual MFU definition. Training
is 3x the forward (backward = 2x forward). Peak numbers are dense bfloat16 per chip.
"""

from __future__ import annotations

from qwen_jax.model.config import QwenConfig

# Dense bf16 peak FLOP/s per chip, by the substring jax reports in `device.device_kind`.
# Order matters: more specific names first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),  # SXM, dense
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM, dense
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind, or None when unknown (no MFU then)."""
    for name, peak in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def mean_keys_per_query(seq_len: int, causal: bool = True, window: int = 0) -> float:
    """Average number of keys a query attends to over a sequence of seq_len tokens."""
    if not causal:
        return float(seq_len if window <= 0 else min(window, seq_len))
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # the first `window` queries see 1..window keys, the rest see exactly `window`
    ramp = window * (window + 1) / 2
    return (ramp + (seq_len - window) * window) / seq_len


def forward_flops_per_token(config: QwenConfig, seq_len: int, windows=None) -> float:
    h, f, v, n_layers = (config.hidden_size, config.mlp_width, config.vocab_size,
                         config.num_hidden_layers)
    matmul = 2 * (n_layers * (4 * h * h + 3 * h * f) + h * v)
    windows = windows if windows is not None else (0,) * n_layers
    attn = sum(4 * h * mean_keys_per_query(seq_len, True, w) for w in windows)
    return matmul + attn


def train_flops_per_token(config: QwenConfig, seq_len: int) -> float:
    """Training never applies windows (inference-only, as in the original)."""
    return 3 * forward_flops_per_token(config, seq_len)


def mfu(flops_per_second_per_device: float, device_kind: str) -> float | None:
    peak = peak_flops_per_device(device_kind)
    return None if peak is None else flops_per_second_per_device / peak
