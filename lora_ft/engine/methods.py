"""PEFT methods: what `method` trains (LoRA, DoRA, IA3, VeRA, or every weight), each built through PEFT's own config;
what each can do (a quantised base, a merge, a GGUF adapter); and the combinations PEFT cannot do, refused in one
line before a model is loaded rather than deep inside PEFT."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.method_table import METHODS, Method

# torch, PEFT and models are imported where they are used: the listing reads `METHODS` without loading them. Their
# types are named, not imported, in the signatures:
Module = Any  # torch.nn.Module
PeftConfig = Any  # peft.PeftConfig
TaskType = Any  # peft.TaskType


# PiSSA and OLoRA start A and B from the weights' singular vectors (QR for OLoRA) and subtract B A from the base
# weights: the adapter as trained fits only that adjusted base (see `keep_initial`).
REWRITES_BASE = ("pissa", "olora")
INITIAL_ADAPTER = "initial_adapter"  # in the run folder: the adapter as it started, for the conversion


def of(config: RunConfig | dict[str, Any]) -> Method:
    """The method a run config (or a manifest's recorded config) names; adapters from before `method` are LoRA."""
    name = config.get("method", "lora") if isinstance(config, dict) else config.method
    if name not in METHODS:  # a hand-edited manifest: RunConfig's own checks never let one through
        raise UserError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def check(config: RunConfig) -> None:
    """The combinations refused before anything is loaded, each with its reason."""
    method, init = of(config), config.init_lora_weights
    if config.quantize and not method.quantized_base:
        why = "it trains every weight" if not method.adapter else "PEFT has no quantised layers for it"
        raise UserError(f"`method` {method.name} cannot train a quantised base ({why}): leave `quantize` unset")
    if not method.lora_variants:
        if config.use_rslora:
            raise UserError(f"`use_rslora` applies to lora and dora, not to `method` {method.name}")
        if init != "default":
            raise UserError(f"`init_lora_weights` {init} applies to lora and dora, not to `method` {method.name}")
    if method.name == "full" and config.target_modules:
        raise UserError("`target_modules`: `method` full trains every weight; it names no modules")
    if init == "loftq" and not _cuda():
        raise UserError("`init_lora_weights` loftq: PEFT's LoftQ quantises on a CUDA GPU, and there is none here")
    if method.name == "dora" and init in REWRITES_BASE:  # PEFT's conversion to plain LoRA drops DoRA's magnitudes
        raise UserError(f"`init_lora_weights` {init} with `method` dora: PEFT cannot convert the result to plain LoRA")
    if config.quantize and init in (*REWRITES_BASE, "loftq"):
        raise UserError(f"`init_lora_weights` {init} starts from the full-precision weights: leave `quantize` unset")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def peft_config(model: Module, task_type: TaskType, config: RunConfig) -> PeftConfig | None:
    """PEFT's config for the run's method, on the architecture's projections unless `config.target_modules` names
    others; None for full fine-tuning."""
    from peft import IA3Config, LoftQConfig, LoraConfig, VeraConfig

    check(config)
    method = of(config)
    if not method.adapter:
        return None
    targets, conv1d = chosen_targets(model, config)
    if method.name == "ia3":
        # IA3 scales a feed-forward layer's input and any other layer's output. PEFT requires its feed-forward
        # names to be among the target names, so both name a layer with its parent: "mlp.c_proj", "attn.c_proj".
        targets = _with_parent(model, targets)
        feedforward = [t for t in targets if t.split(".")[0] in ("mlp", "feed_forward", "ffn")]
        return IA3Config(
            task_type=task_type, target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=conv1d
        )
    if method.name == "vera":
        return VeraConfig(
            task_type=task_type,
            r=config.lora_r,
            target_modules=targets,
            vera_dropout=config.lora_dropout,
            fan_in_fan_out=conv1d,
        )
    if config.init_lora_weights == "olora" and conv1d:
        raise UserError(f"`init_lora_weights` olora: PEFT cannot start OLoRA on {type(model).__name__}'s Conv1D layers")
    init = config.init_lora_weights
    return LoraConfig(
        task_type=task_type,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        use_dora=method.name == "dora",
        use_rslora=config.use_rslora,
        init_lora_weights=True if init == "default" else init,
        loftq_config=LoftQConfig(loftq_bits=4) if init == "loftq" else {},
    )


def wrap(model: Module, task_type: TaskType, config: RunConfig) -> Module:
    """`model` with the run's method attached (PEFT), or as it is for full fine-tuning (every weight trains)."""
    from peft import get_peft_model

    from .hardware import base_is_bf16, trainables_in_float32

    peft = peft_config(model, task_type, config)
    wrapped = model if peft is None else get_peft_model(model, peft)
    if base_is_bf16(wrapped):
        trainables_in_float32(wrapped)
    return wrapped


def trains_base(config: RunConfig) -> bool:
    """Whether the run trains the base's own weights (full fine-tuning), so that they must stay float32."""
    return not of(config).adapter


def adapter_off_is_base(config: RunConfig) -> bool:
    """Whether the trained model with its adapter switched off is the untuned base: not for full fine-tuning (no
    adapter), nor for PiSSA and OLoRA (they changed the base weights)."""
    return of(config).adapter and config.init_lora_weights not in REWRITES_BASE


def _with_parent(model: Module, leaves: list[str]) -> list[str]:
    """`leaves` (layer names) as "parent.leaf" for every place each occurs in the model."""
    found = set()
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] in leaves:
            found.add(".".join(parts[-2:]))
    return sorted(found)


def keep_initial(model: Any, config: RunConfig, folder: Path) -> Path | None:
    """PiSSA and OLoRA: the adapter as it started, saved to `folder` before training, or None for other inits.
    At save time PEFT turns trained minus initial into a plain LoRA adapter of rank 2r, which goes on the
    original base like any other (see `save_kwargs`). A resumed run starts the same way (the SVD is deterministic)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or config.init_lora_weights not in REWRITES_BASE:
        return None
    lora = model.peft_config["default"]
    init, lora.init_lora_weights = lora.init_lora_weights, True  # loading the initial adapter must not re-run PiSSA
    try:
        model.save_pretrained(folder)
    finally:
        lora.init_lora_weights = init
    return folder


def save_kwargs(run_folder: Path) -> dict[str, Any]:
    """`save_pretrained`'s arguments for the final adapter: the conversion from the initial adapter, when kept."""
    initial = run_folder / INITIAL_ADAPTER
    return {"path_initial_model_for_weight_conversion": str(initial)} if initial.is_dir() else {}


def finish_conversion(model: Any, folder: Path) -> None:
    """After a converted save (`save_kwargs`): PEFT 0.21's conversion writes the converted lora_A/lora_B pairs only,
    dropping the adapter's other trained tensors (modules_to_save: a classifier's head), which the conversion does
    not change: they are added back as trained. Then the initial adapter goes."""
    initial = folder / INITIAL_ADAPTER
    if not initial.is_dir():
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    saved = load_file(path)
    dropped = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items() if k not in saved}
    if dropped:
        save_file(saved | dropped, path, metadata={"format": "pt"})
    shutil.rmtree(initial)


def trainable(model: Module) -> tuple[int, int]:
    """(trainable, all) parameters of a PEFT model or of a whole model being fine-tuned."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def section(model: Module, config: RunConfig) -> dict[str, Any]:
    """The manifest's `lora` section: the method, what it adapted, and how many parameters it trained."""
    from peft import LoraConfig, PeftModel

    trained, total = trainable(model)
    found: dict[str, Any] = {"method": config.method}
    if isinstance(model, PeftModel):
        peft = model.peft_config["default"]
        found |= {
            "peft_type": str(peft.peft_type.value),
            "target_modules": sorted(peft.target_modules),
            "fan_in_fan_out": peft.fan_in_fan_out,
            "modules_to_save": sorted(model.modules_to_save or []),
        }
        if isinstance(peft, LoraConfig):
            found |= {"r": peft.r, "use_rslora": peft.use_rslora, "init_lora_weights": config.init_lora_weights}
    return found | {"trainable_parameters": trained, "total_parameters": total}


def lora_targets(model: Module) -> tuple[list[str], bool]:
    """Names of the linear projections inside the transformer blocks (attention and MLP), and whether they
    are GPT-2-style `Conv1D` layers, whose weights are stored transposed (`fan_in_fan_out=True`)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from .models import HEAD_NAMES

    names: set[str] = set()
    conv1d = False
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in HEAD_NAMES or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        names.add(leaf)
        conv1d |= isinstance(module, Conv1D)
    if not names:
        raise UserError(f"{type(model).__name__}: found no linear layers to attach LoRA to; pass `target_modules`")
    return sorted(names), conv1d


def chosen_targets(model: Module, config: RunConfig) -> tuple[list[str], bool]:
    """The layers to adapt: `config.target_modules`, checked to be in the model, else the architecture's
    projections (`lora_targets`); and whether they are Conv1D layers."""
    found, conv1d = lora_targets(model)
    targets = config.target_modules
    if targets:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in targets if t not in present]
        if unknown:
            raise UserError(f"`target_modules`: {unknown} not in {type(model).__name__} (it has {found})")
    return targets or found, conv1d
