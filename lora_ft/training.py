"""What both tasks share around the HF Trainer: its arguments, and the manifest sections it fills."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainingArguments

from .config import RunConfig


@dataclass
class TrainResult:
    """What `spam.train` and `instruct.train` return: the adapter folder, its manifest, the trained model."""

    adapter_dir: Path
    manifest: dict[str, Any]
    model: PeftModel


def training_args(
    config: RunConfig,
    output_dir: Path,
    train_rows: int,
    best_metric: str,
    args_class: type[TrainingArguments] = TrainingArguments,
    **extra: Any,
) -> TrainingArguments:
    """Evaluate on val every epoch and keep the best epoch by `best_metric`, length-grouped batches, seeded."""
    steps_per_epoch = math.ceil(train_rows / config.batch_size)
    # With --max-steps, evaluate (and keep the best) every epoch or at the last step, whichever comes first.
    period = min(steps_per_epoch, config.max_steps) if config.max_steps else None
    return args_class(
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
        **extra,
    )


def lora_section(model: PeftModel, lora: LoraConfig) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "target_modules": sorted(lora.target_modules),
        "fan_in_fan_out": lora.fan_in_fan_out,
        "modules_to_save": sorted(model.modules_to_save or []),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def training_section(trainer: Trainer, seconds: float) -> dict[str, Any]:
    state = trainer.state
    return {
        "seconds": round(seconds, 2),
        "steps": state.global_step,
        "epochs": state.epoch,
        "best_step": int(state.best_model_checkpoint.rsplit("-", 1)[-1]) if state.best_model_checkpoint else None,
        f"best_val_{trainer.args.metric_for_best_model.removeprefix('eval_')}": state.best_metric,
        "device": str(trainer.args.device),
        "precision": "fp32",
        "log_history": state.log_history,
    }
