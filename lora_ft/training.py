"""What both tasks share around the HF Trainer: its arguments, and the manifest sections it fills."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainingArguments

from .config import RunConfig
from .errors import UserError


@dataclass
class TrainResult:
    """What `spam.train` and `instruct.train` return: the adapter folder, its manifest, the trained model."""

    adapter_dir: Path
    manifest: dict[str, Any]
    model: PeftModel


def cpu_only() -> bool:
    """No GPU (or other accelerator). Trainer must then be told to use the CPU: otherwise the processes that torchrun
    or `accelerate launch` start each train alone on all the data, instead of together over gloo."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator else torch.cuda.is_available())


def processes() -> PartialState:
    """The processes of this run: just this one, or all those that torchrun or `accelerate launch` started."""
    return PartialState(cpu=cpu_only())


def cpu_has_native_bf16() -> bool:
    """AVX-512-BF16 or AMX: bf16 matmuls run natively. Elsewhere bf16 on the CPU is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str) -> str:
    """What `--precision` means on this machine: auto is bf16 autocast where the hardware runs bf16 natively,
    fp16 (with loss scaling) on CUDA GPUs without bf16, and fp32 otherwise."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16:
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name()} has no bf16; use fp16 or fp32")
        return ("bf16" if bf16 else "fp16") if requested == "auto" else requested
    if requested == "fp16":
        raise UserError("--precision fp16 needs a CUDA GPU (loss scaling); on the CPU use bf16 or fp32")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return requested


def batch_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(real, with padding) tokens of a collated batch."""
    ids = batch["input_ids"]
    return (int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()), ids.numel()


class CountsTokens:
    """A Trainer mixin that records the tokens of every training batch, real (attention mask) and with padding,
    to show what dynamic padding and length grouping save."""

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.__dict__.setdefault("counted_tokens", []).append(batch_tokens(inputs))
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


class CountingTrainer(CountsTokens, Trainer):
    pass


def training_args(
    config: RunConfig,
    output_dir: Path,
    train_rows: int,
    best_metric: str,
    precision: str,
    args_class: type[TrainingArguments] = TrainingArguments,
    **extra: Any,
) -> TrainingArguments:
    """Evaluate on val every epoch and keep the best epoch by `best_metric`, length-grouped batches, seeded,
    mixed precision as resolved (`resolve_precision`). `config.batch_size` is per process: a step of N processes
    takes N batches."""
    steps_per_epoch = math.ceil(train_rows / (config.batch_size * processes().num_processes))
    # With --max-steps, evaluate (and keep the best) every epoch or at the last step, whichever comes first.
    period = min(steps_per_epoch, config.max_steps) if config.max_steps else None
    arguments: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        eval_strategy="steps" if period else "epoch",
        save_strategy="steps" if period else "epoch",
        eval_steps=period,
        save_steps=period,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        save_total_limit=1,
        save_only_model=True,
        logging_steps=max(1, min(steps_per_epoch, config.max_steps or steps_per_epoch) // 10),
        train_sampling_strategy="group_by_length",
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),
        ddp_find_unused_parameters=False,  # LoRA and the head are used in every forward pass
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )
    return args_class(**arguments | extra)


def trained_model(trainer: Trainer) -> Any:
    """The trained model in eval mode, without the mixed-precision wrapper accelerate put around its forward: what
    is measured after training then runs as the saved adapter will when loaded (float32 unless quantised)."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()


def fit(trainer: Trainer) -> float:
    """Train, and return the seconds it took, once every process has finished (and loaded the best checkpoint)."""
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.accelerator.wait_for_everyone()
    return seconds


def lora_section(model: PeftModel, lora: LoraConfig) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "target_modules": sorted(lora.target_modules),
        "fan_in_fan_out": lora.fan_in_fan_out,
        "modules_to_save": sorted(model.modules_to_save or []),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def training_section(trainer: Trainer, seconds: float, precision: str) -> dict[str, Any]:
    state, args = trainer.state, trainer.args
    counted = getattr(trainer, "counted_tokens", [])  # this process's batches
    real, total = sum(r for r, _ in counted), sum(t for _, t in counted)
    return {
        "seconds": round(seconds, 2),
        "steps": state.global_step,
        "epochs": state.epoch,
        "best_step": int(state.best_model_checkpoint.rsplit("-", 1)[-1]) if state.best_model_checkpoint else None,
        f"best_val_{trainer.args.metric_for_best_model.removeprefix('eval_')}": state.best_metric,
        "device": str(args.device),
        "world_size": args.world_size,
        "global_batch_size": args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "precision": precision,
        "tokens": {"real": real, "with_padding": total, "real_share": round(real / total, 4) if total else None},
        "tokens_per_second": round(real * args.world_size / seconds, 1) if seconds else None,
        "log_history": state.log_history,
    }
