"""What both tasks share around the HF Trainer: its arguments, and the manifest sections it fills."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from .config import RunConfig
from .errors import Interrupted, UserError


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


class Tally(TrainerCallback, ExportableState):
    """Tokens trained on (real and with padding), seconds spent training, and the steps a run was resumed at.
    Trainer stores this in every checkpoint and restores it on resume, so a resumed run reports the whole run."""

    def __init__(self, real: int = 0, with_padding: int = 0, seconds: float = 0.0, resumed_at: list | None = None):
        self.real, self.with_padding, self.seconds = real, with_padding, seconds
        self.resumed_at = list(resumed_at or [])
        self._since = time.perf_counter()

    def state(self) -> dict[str, Any]:
        names = ("real", "with_padding", "seconds", "resumed_at")
        return {"args": {name: getattr(self, name) for name in names}}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._since = time.perf_counter()
        if state.global_step:
            self.resumed_at.append(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.seconds += now - self._since
        self._since = now


class StopOnSignal(TrainerCallback):
    """After SIGINT or SIGTERM (see `catching_signals`), finish the step, save a checkpoint there and stop; `fit`
    then raises `Interrupted`. A second SIGINT stops at once, without a new checkpoint. Processes of a distributed
    run agree at every step end whether any of them got a signal, so that all stop after the same step."""

    def __init__(self) -> None:
        self.received: int | None = None  # this process's signal
        self.stopping = False  # agreed by every process, at a step end
        self._mid_epoch = False

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def agree(self, args: TrainingArguments) -> int | None:
        """The signal any process got (the largest number, if several), the same in every process."""
        if args.world_size > 1:
            flag = torch.tensor([self.received or 0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.received = int(flag.item()) or None
        return self.received

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.stopping and self.agree(args) is not None:
            self.stopping = True
            self._mid_epoch = state.epoch != int(state.epoch)
            control.should_save = True

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopping:
            control.should_training_stop = True

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # Stopped mid-epoch: no end-of-epoch evaluation, which the uninterrupted run would not make at this step.
        # Stopped on an epoch's last step, that evaluation (and its save) happens, as it would have anyway.
        if self.stopping and self._mid_epoch:
            control.should_evaluate = control.should_save = False


class SeededLengthGroupedSampler(LengthGroupedSampler, TrainerCallback):
    """Length-grouped order drawn from (seed, epoch) rather than from the global random state, so that an epoch's
    order does not depend on what ran before it and a run resumed mid-epoch skips exactly the batches it trained.
    It is also a callback that sets its epoch as each one begins: accelerate's `set_epoch` does not reach it through
    the samplers a resumed distributed run wraps it in."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()

    def on_epoch_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.set_epoch(int(state.epoch or 0))  # a resumed run starts inside its epoch: 1.5 is epoch 1


def batch_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(real, with padding) tokens of a collated batch."""
    ids = batch["input_ids"]
    return (int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()), ids.numel()


def find_callback(trainer: Trainer, kind: type) -> Any:
    """The trainer's callback of this kind (a resumed run replaces stateful callbacks with restored copies)."""
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


class Resumable:
    """What lora_ft adds to Trainer and SFTTrainer: a data order a resumed run repeats, a clean stop on SIGINT or
    SIGTERM, and counts of the tokens of every training batch, real (attention mask) and with padding, to show
    what dynamic padding and length grouping save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted_tokens: list[tuple[int, int]] = []  # this process's batches, in order (bench fits to them)
        self.add_callback(Tally())  # type: ignore[attr-defined]
        self.add_callback(StopOnSignal())  # type: ignore[attr-defined]

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        sampler = super()._get_train_sampler(*args, **kwargs)  # type: ignore[misc]
        if isinstance(sampler, LengthGroupedSampler):
            sampler = SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self.args.data_seed)  # type: ignore[attr-defined]
            self.callback_handler.remove_callback(SeededLengthGroupedSampler)  # type: ignore[attr-defined]
            self.add_callback(sampler)  # type: ignore[attr-defined]
        return sampler

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        real, with_padding = batch_tokens(inputs)
        self.counted_tokens.append((real, with_padding))
        tally = find_callback(self, Tally)  # type: ignore[arg-type]
        tally.real, tally.with_padding = tally.real + real, tally.with_padding + with_padding
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


class ClassifierTrainer(Resumable, Trainer):
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
        save_total_limit=2,  # the best and the last: a resumed run continues from the last
        restore_callback_states_from_checkpoint=True,  # Tally's counts, on --resume
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


def fit(trainer: Trainer, resume_from: Path | None = None) -> None:
    """Train (from the checkpoint `resume_from`, if given) until every process has finished and loaded the best
    checkpoint. On SIGINT or SIGTERM, save a checkpoint at the step reached and raise `Interrupted`."""
    if resume_from is not None:
        state = TrainerState.load_from_json(str(resume_from / TRAINER_STATE_NAME))
        if state.global_step >= state.max_steps:  # training had finished; Trainer would train one step more
            _restore(trainer, state, resume_from)
            return
    stop = find_callback(trainer, StopOnSignal)
    with stop.catching_signals():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.accelerator.wait_for_everyone()
    signum = stop.agree(trainer.args)  # also a signal that came after the last step: training is over, but stop
    if signum is not None:
        checkpoint = get_last_checkpoint(trainer.args.output_dir)
        raise Interrupted(signum, trainer.state.global_step, Path(checkpoint) if checkpoint else None)


def _restore(trainer: Trainer, state: TrainerState, checkpoint: Path) -> None:
    """Where a run that finished training (and then failed) left off: its `state` (read from `checkpoint`), counts,
    and the best (else the last) checkpoint's weights."""
    trainer.state = state
    tally = find_callback(trainer, Tally)
    for name, value in trainer.state.stateful_callbacks.get("Tally", {}).get("args", {}).items():
        setattr(tally, name, value)
    tally.resumed_at.append(trainer.state.global_step)
    weights = Path(trainer.state.best_model_checkpoint or checkpoint) / SAFETENSORS_WEIGHTS_NAME
    set_peft_model_state_dict(trainer.model, load_file(weights))


def lora_section(model: PeftModel, lora: LoraConfig) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "target_modules": sorted(lora.target_modules),
        "fan_in_fan_out": lora.fan_in_fan_out,
        "modules_to_save": sorted(model.modules_to_save or []),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def training_section(trainer: Trainer, precision: str) -> dict[str, Any]:
    state, args = trainer.state, trainer.args
    tally = find_callback(trainer, Tally)  # this process's batches, over every part of a resumed run
    real, total, seconds = tally.real, tally.with_padding, tally.seconds
    return {
        "seconds": round(seconds, 2),
        "resumed_at_steps": tally.resumed_at,
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
