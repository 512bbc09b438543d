"""Chip facts and the roofline model behind compile-only step-time and MFU estimates.

Per-chip numbers (public Cloud TPU spec pages, docs.cloud.google.com/tpu/docs/<v4|v5e|v5p|v6e>):

    chip  HBM     HBM bandwidth  peak bf16   ICI (bidirectional, per chip)   DCN per chip
    v4    32 GiB  1200 GB/s      275 TF/s    1.1 PB/s all-reduce per 4096-chip pod
                                                                          (assumed 25 Gb/s)
    v5e   16 GiB   819 GB/s      197 TF/s    400 GB/s              25 Gb/s (6.4 Tb/s per 256)
    v5p   95 GiB  2765 GB/s      459 TF/s    1200 GB/s             50 Gb/s
    v6e   32 GiB  1640 GB/s      918 TF/s    800 GB/s              (assumed 25 Gb/s)

Peak FLOP/s come from `qwen_jax.flops.PEAK_FLOPS`. The collective bandwidth a chip gets is
taken as half its bidirectional ICI figure (what it can receive): v5e 200 GB/s, v5p 600 GB/s,
v6e 400 GB/s, and for v4 the pod all-reduce bandwidth per chip, 1.1e15 / 4096 = 268 GB/s
(v5e's and v6e's pod all-reduce figures per chip equal half their ICI numbers, so the two
definitions agree). v4's compile-only topology exposes each TensorCore as a device (two per
chip), so a v4 device gets half the chip's HBM, FLOP/s and bandwidth.

The model, per device and per training step (P parameters, tokens N = batch x seq, k
microbatches, mesh data x fsdp x tensor = d x f x t, bf16 compute over float32 masters):

    model FLOPs      M = 3 x forward FLOPs (flops.py: matmuls + causal attention) / devices
    executed FLOPs   E = M + forward FLOPs the remat policy recomputes in the backward pass:
                     none 0; minimal (dots without batch dims saved) the attention;
                     save_dot_except_mlp the MLP; full every layer (all but the LM head)
    compute time     E / peak
    FSDP traffic     per microbatch: all-gather of the bf16 weights in the forward and again
                     in the backward, reduce-scatter of float32 gradients:
                     k x (f-1)/f x P/t x (2 + 2 + 4) bytes
    data traffic     k x all-reduce of float32 gradient shards over d: 2 (d-1)/d x 4P/(f t);
                     over DCN when d spans slices
    tensor traffic   per layer and microbatch, 2 activation all-reduces [b, T, H] bf16 in the
                     forward, 2 in the backward, 2 more per recomputed forward (full remat):
                     2 (t-1)/t x 2 b T H bytes each
    comm time        ICI bytes / ICI bandwidth + DCN bytes / DCN bandwidth
    step time        max(compute, FSDP + data comm) + tensor comm: XLA schedules the next
                     layer's weight all-gather and the previous one's gradient reduce-scatter
                     asynchronously beside the current layer's matmuls, so those overlap; a
                     tensor-parallel all-reduce produces the activations the next matmul
                     needs, so it adds to the step. The serial sum of everything is reported
                     too as the pessimistic bound
    MFU              M / (step time x peak)

That roofline runs every FLOP at peak and spends no time on HBM traffic. With XLA's cost
analysis of the compiled step (per device, scaled to the whole step by
`qwen_jax.train.aot.xla_cost`: flops F, bytes accessed B, and `optimal_seconds`, XLA's own
sum over instructions of each one's time at the chip's compute or memory bound, whichever
is slower) a second estimate replaces the analytic compute time by `optimal_seconds`, or by
max(F / peak, B / HBM bandwidth) where XLA has no timing model for some instruction: the
compiler's count of what runs, including the remat recompute, every elementwise pass over
memory and matmuls below peak. Neither is a measurement; both are upper bounds on MFU
(M <= F, so neither can exceed 100%).
"""

from __future__ import annotations

import dataclasses

from qwen_jax.model.config import QwenConfig
from qwen_jax.train import flops

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    device_kind: str  # what jax reports, for flops.peak_flops_per_device
    hbm_bytes: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # collective bandwidth per chip (see the module docstring)
    dcn_bytes_per_s: float

    @property
    def peak_flops(self) -> float:
        return flops.peak_flops_per_device(self.device_kind)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 1200e9, 1.1e15 / 4096, 25e9 / 8),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 819e9, 400e9 / 2, 25e9 / 8),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2765e9, 1200e9 / 2, 50e9 / 8),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 1640e9, 800e9 / 2, 25e9 / 8),
}


def chip_for(device_kind: str) -> Chip:
    kind = device_kind.lower()
    for key, name in (("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5", "v5p"),
                      ("v4", "v4")):
        if key in kind:
            return CHIPS[name]
    raise ValueError(f"no chip facts for device kind {device_kind!r}; known: {sorted(CHIPS)}")


def recomputed_forward_flops_per_token(config: QwenConfig, seq_len: int, policy: str) -> float:
    """Forward FLOPs per token that `policy` runs again in the backward pass."""
    h, f, n_layers = config.hidden_size, config.mlp_width, config.num_hidden_layers
    attention = n_layers * 4 * h * flops.mean_keys_per_query(seq_len)
    mlp = n_layers * 2 * 3 * h * f
    if policy == "none":
        return 0.0
    if policy == "minimal":
        return attention
    if policy == "save_dot_except_mlp":
        return mlp
    if policy == "full":
        return n_layers * 2 * (4 * h * h + 3 * h * f) + attention
    raise ValueError(f"unknown remat policy {policy!r}")


def estimate(config: QwenConfig, *, chip: Chip, seq_len: int, global_batch: int,
             microbatches: int, mesh: dict, num_slices: int = 1,
             devices_per_chip: int = 1, xla: dict | None = None) -> dict:
    """The roofline of one training step; times in seconds, traffic in bytes per device.
    `xla` ({"flops", "bytes_accessed"} per device for the whole step) adds the estimate from
    XLA's counts (`xla_*` keys)."""
    d, f, t = mesh["data"], mesh["fsdp"], mesh["tensor"]
    devices = d * f * t
    tokens = global_batch * seq_len
    peak = chip.peak_flops / devices_per_chip
    ici = chip.ici_bytes_per_s / devices_per_chip
    dcn = chip.dcn_bytes_per_s / devices_per_chip
    model = flops.train_flops_per_token(config, seq_len) * tokens / devices
    extra = recomputed_forward_flops_per_token(config, seq_len, config.remat_policy)
    executed = model + extra * tokens / devices

    p, k = config.num_params(), microbatches
    fsdp_bytes = k * (f - 1) / f * p / t * (2 + 2 + 4)
    data_bytes = k * 2 * (d - 1) / d * 4 * p / (f * t)
    rows = global_batch / k / (d * f)  # sequences per device per microbatch
    passes = {"none": 4, "minimal": 4, "save_dot_except_mlp": 5, "full": 6}[config.remat_policy]
    tensor_bytes = (k * config.num_hidden_layers * passes
                    * 2 * (t - 1) / t * 2 * rows * seq_len * config.hidden_size)
    across_slices = num_slices > 1
    ici_bytes = fsdp_bytes + tensor_bytes + (0 if across_slices else data_bytes)
    tensor_comm = tensor_bytes / ici
    overlapped = (ici_bytes - tensor_bytes) / ici + (data_bytes / dcn if across_slices else 0.0)
    comm = overlapped + tensor_comm
    compute = executed / peak
    step = max(compute, overlapped) + tensor_comm
    serial = compute + comm
    out = {
        "model_flops_per_device": model, "executed_flops_per_device": executed,
        "peak_flops_per_device": peak, "ici_bytes_per_device": ici_bytes,
        "dcn_bytes_per_device": data_bytes if across_slices else 0.0,
        "compute_seconds": compute, "comm_seconds": comm, "tensor_comm_seconds": tensor_comm,
        "step_seconds": step, "serial_step_seconds": serial, "mfu": model / (step * peak),
        "serial_mfu": model / (serial * peak), "tokens_per_second": tokens / step,
        "bound": "compute" if compute >= overlapped else "communication",
    }
    if xla:
        hbm = chip.hbm_bytes_per_s / devices_per_chip
        x_compute, x_memory = xla["flops"] / peak, xla["bytes_accessed"] / hbm
        optimal = xla.get("optimal_seconds")
        if optimal:  # XLA's own timing, op by op (compute or memory, whichever bounds it)
            device, kind = optimal, "XLA per-op time"
        else:
            device, kind = max((x_compute, "compute"), (x_memory, "HBM bandwidth"))
        x_step = max(device, overlapped) + tensor_comm
        out.update(xla_compute_seconds=x_compute, xla_memory_seconds=x_memory,
                   xla_device_seconds=device, xla_step_seconds=x_step,
                   xla_mfu=model / (x_step * peak), xla_tokens_per_second=tokens / x_step,
                   xla_bound=kind if device >= overlapped else "communication")
    return out
