"""How a run uses the arithmetic of the machine it is on: what `--precision auto` means here, the dtype the frozen
base is held in, the attention kernel for a batch's shape, and the same choices for inference. Each choice was
measured (docs/benchmark.md): what did not pay is not here."""

from __future__ import annotations

import os
import types
from typing import Any

import torch

from ..core.errors import UserError

# "1" or "0": take the CPU for one with (or without) native bf16, whatever it reports. The test suite runs both
# ways on any machine with it; a user can keep a native-bf16 CPU on float32 with `--precision fp32` instead.
NATIVE_BF16_ENV = "LORA_FT_NATIVE_BF16"
# Rows up to this many tokens use eager attention on the CPU; longer ones SDPA (see `choose_attention`).
CPU_EAGER_ATTENTION_MAX_TOKENS = 256


def cpu_has_native_bf16() -> bool:
    """AVX-512-BF16 or AMX: bf16 matmuls run natively. Elsewhere bf16 on the CPU is emulated and slower than fp32."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str) -> str:
    """What `--precision` means on this machine: auto is bf16 where the hardware runs bf16 natively, fp16 (with loss
    scaling) on CUDA GPUs without bf16, and fp32 otherwise."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16:
            raise UserError(f"`precision` bf16: {torch.cuda.get_device_name()} has no bf16; use fp16 or fp32")
        return ("bf16" if bf16 else "fp16") if requested == "auto" else requested
    if requested == "fp16":
        raise UserError("`precision` fp16 needs a CUDA GPU (loss scaling); on the CPU use bf16 or fp32")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return requested


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in at a resolved precision (fp32, bf16 or fp16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def holds_base_in_bf16(precision: str, trains_base: bool, quantize: str | None) -> bool:
    """Whether the base is held in bf16: where the run computes in bf16 and the base is frozen and not quantised.
    Autocast would otherwise cast every float32 weight to bf16 at every step (7% of a step, profiled), and the
    weights take half the memory. What trains (the adapter, a new head) stays float32, and so does AdamW's state
    (`trainables_in_float32`); the saved adapter is float32, and merge folds it into the float32 weights it reads."""
    return precision == "bf16" and not trains_base and quantize is None


HELD_IN_BF16 = "_lora_ft_held_in_bf16"  # marks a model `hold_in_bf16` made


def hold_in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """`model` cast to bf16, its forward pass always under bf16 autocast (training, scoring, `generate`, and a
    Python user's own calls alike: its float32 adapter and head then compute in bf16 as in training), with GPT-2's
    tanh-GELU as torch's one kernel (transformers' `GELUTanh`: the same function, computed in one pass instead of
    eight element-wise ones; within bf16's rounding of the original)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
    model = model.to(torch.bfloat16)
    device = next(model.parameters()).device.type
    # as accelerate wraps a forward; bound to the model, so that a deep copy's forward is the copy's own
    model.forward = types.MethodType(torch.autocast(device, dtype=torch.bfloat16)(type(model).forward), model)
    setattr(model, HELD_IN_BF16, True)
    return model


def trainables_in_float32(model: torch.nn.Module) -> None:
    """Trainable weights in float32 on a bf16 base (PEFT makes its adapter weights float32 already; a trained head,
    `modules_to_save`, is a copy of the base's bf16 layer). Inputs then reach them in bf16 under autocast, which
    casts the small adapter weights instead of PEFT casting every (large) input to float32 and back."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    skip_input_casts(model)


def skip_input_casts(model: torch.nn.Module) -> None:
    """PEFT casts each adapted layer's input to its adapter's dtype (float32); under bf16 autocast the product is
    bf16 anyway, so the cast and its way back are two copies of a large activation for nothing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def base_is_bf16(model: torch.nn.Module) -> bool:
    """Whether `model` (or the base inside a PEFT model) was held in bf16 by `hold_in_bf16`."""
    return any(getattr(module, HELD_IN_BF16, False) for module in model.modules())


def choose_attention(model: torch.nn.Module) -> None:
    """On the CPU, eager attention for batches of up to CPU_EAGER_ATTENTION_MAX_TOKENS tokens a row, SDPA for
    longer ones, chosen at each forward pass by the batch's width. At short rows torch's CPU SDPA (flash attention)
    costs far more than its matmuls: its backward was a quarter of a 40-token bf16 step (profiled). Eager keeps a
    row's L x L scores, which only long rows make large. GPUs keep SDPA."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return  # another kernel chosen on purpose (flash_attention_2, ...): left alone
    if next(model.parameters()).device.type != "cpu":
        return

    def by_width(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            wide = ids.shape[1] > CPU_EAGER_ATTENTION_MAX_TOKENS
            module.config._attn_implementation = "sdpa" if wide else "eager"

    model.register_forward_pre_hook(by_width, with_kwargs=True)


def fused_head_at_labelled_positions() -> None:
    """TRL 1.16's fused LM head (DPOTrainer's log-probabilities, SFTTrainer's evaluation loss) projects only the
    positions that have a label where Triton folds its tiles (CUDA, XPU), and every position elsewhere, so that a
    Neuron device compiles one tile shape. Nothing is compiled on a CPU, and a prompt is most of a row: scoring
    every position there made a tiny model's DPO run 4.8x the CPU time and 2.5x the peak memory, for the same
    figures (docs/benchmark.md). CPUs take the labelled-positions path too; TRL still folds the tiles in torch."""
    from trl.trainer import utils as trl_utils

    shipped = trl_utils._use_triton  # the one switch TRL's fused head reads; a test fails if TRL renames it
    if getattr(shipped, "__wrapped__", None) is not None:
        return  # switched already (every trainer a process builds calls this)

    def labelled_only(device: torch.device) -> bool:
        return device.type == "cpu" or shipped(device)

    labelled_only.__wrapped__ = shipped  # type: ignore[attr-defined]
    trl_utils._use_triton = labelled_only
