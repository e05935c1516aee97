"""What every task's run shares: its setup (`start`), the Trainer's arguments, training with a clean stop and exact
resume (`fit`), and the manifest it writes (`manifest`, `save`). A task module keeps only what differs."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from datasets import Dataset, DatasetDict
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import SAFE_WEIGHTS_NAME

from ..core import plots
from ..core.config import RunConfig, with_model
from ..core.errors import Interrupted, UserError
from ..core.files import now_iso, peak_rss_bytes, sha256_file
from ..core.manifest import Manifest
from ..data import SPLITS
from . import adapter_config, adapters, gguf_reading, methods, models, runs
from .adapters import TrainResult as TrainResult  # a task's `train` returns it; its name here from before
from .callbacks import (
    ProgressLog,
    SeededLengthGroupedSampler,
    ShowProgress,
    StopOnSignal,
    Tally,
    batch_tokens,
    find_callback,
)
from .hardware import resolve_precision

log = logging.getLogger("lora_ft")


@dataclass
class Start:
    """What a task's run starts from (see `start`)."""

    task: str
    config: RunConfig  # resolved: the model chosen, the output named
    output: Path
    precision: str  # as it runs here (see `resolve_precision`)
    processes: PartialState
    data_path: Path
    splits: DatasetDict
    tokenizer: Any
    base: Any
    base_info: dict[str, Any]  # the manifest's `base` section
    record: dict[str, Any]  # run.json, what `--resume` checks


def start(
    task: str,
    config: RunConfig,
    overwrite: bool,
    resume: Path | None,
    load_splits: Callable[[RunConfig], tuple[Path, DatasetDict]],
    load_base: Callable[..., Any],
) -> Start:
    """The setup every task shares: the model chosen and resolved, the precision, the output checked free, the data
    read and split (`load_splits(config)`), the seed set, the tokenizer and the base loaded (`load_base(source,
    tokenizer, splits, config, precision)`), the base described and the run record made. The first process goes
    first, so that what must be downloaded is downloaded once and the others read the cache."""
    check_sharding()
    methods.check(config)
    config = with_model(config)
    source = models.resolve_model(config.model)
    precision = resolve_precision(config.precision)
    output = Path(config.output) if config.output else adapters.default_output(task, source.short_name)
    config = resolved_paths(config, output, source)
    read = {"the base model": Path(source.location)} if source.kind != "hub" else {}
    read |= {"the data": Path(config.data)} if config.data else {}  # else the data is found below, checked later
    runs.check_run_free(output, overwrite, resuming=resume is not None, keep=read)
    state = processes()
    with state.main_process_first(), gguf_reading.each_file_parsed_once():
        data_path, splits = load_splits(config)
        set_seed(config.seed)  # a new head and the LoRA matrices are initialised from this
        tokenizer = models.load_tokenizer(source)
        base = load_base(source, tokenizer, splits, config, precision)
        models.set_dropout(base, config.model_dropout)  # before LoRA wraps it: LoRA's own is `lora_dropout`
        if config.compile:
            compile_blocks(base)  # traced at their first call, so with the LoRA layers added after this
    positions = models.context_length(base)
    if positions and config.max_length > positions:  # found now, not while scoring after training
        raise UserError(f"`max_length` {config.max_length}: more than the {positions} positions {config.model} has")
    base_info = models.describe_base(source, base)
    record = runs.run_record(task, config, data_path, base_info)
    return Start(task, config, output, precision, state, data_path, splits, tokenizer, base, base_info, record)


# The compiler `compile_blocks` asks for; what it cannot compile runs eager (tests name one that fails).
COMPILER = "inductor"


def compile_blocks(model: torch.nn.Module) -> int:
    """`torch.compile` each block of the model's stack of repeated blocks (GPT2Block, LlamaDecoderLayer) in place
    and return how many. The blocks share one compiled graph (regional compilation: one block's compile time,
    not twelve), and compiling in place keeps the state dict's names, so checkpoints and adapters are unchanged.
    Inductor caches what it compiles on disk, so a second run waits less. A failed compile is logged once and
    that graph runs eager: the run goes on."""
    from accelerate.utils.other import is_repeated_blocks

    backend = EagerOnFailure(COMPILER)
    blocks = [block for stack in model.modules() if is_repeated_blocks(stack) for block in stack]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


class EagerOnFailure:
    """A dynamo backend: `name`'s compiled graph, or where compiling it fails, the graph run as it is."""

    def __init__(self, name: str) -> None:
        self.name, self.failed = name, False

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._dynamo import lookup_backend

        try:
            return lookup_backend(self.name)(graph, example_inputs)
        except Exception as error:  # any failure to compile: run without it
            if not self.failed:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                log.warning("torch.compile (%s) failed, training without it: %s", self.name, reason)
            self.failed = True
            return graph.forward


def resolved_paths(config: RunConfig, output: Path, source: models.ModelSource) -> RunConfig:
    """`config` with the files it names as absolute paths: the run record and the manifest then mean the same files
    from any folder (`--resume` from elsewhere, `evaluate` of a moved adapter)."""
    data = str(Path(config.data).expanduser().resolve()) if config.data else None
    model = source.location if source.kind == "local" else config.model
    return dataclasses.replace(config, output=str(output.expanduser().resolve()), data=data, model=model)


def val_sample(val: Dataset, config: RunConfig) -> Dataset:
    """The val examples a run evaluates on: all, or `max_eval_samples` of them that the seed picks, in order."""
    if config.max_eval_samples is None or len(val) <= config.max_eval_samples:
        return val
    return val.select(sorted(np.random.default_rng(config.seed).choice(len(val), config.max_eval_samples, False)))


def run_folder(run: Start, overwrite: bool, resume: Path | None) -> AbstractContextManager[Path]:
    """The run's `.partial` folder, renamed into place when the `with` block completes (see `runs.training_folder`)."""
    return runs.training_folder(run.output, overwrite, run.record, resume, run.processes)


def manifest(
    run: Start, trainer: Trainer, model: PeftModel, data: dict[str, Any], metrics: dict[str, Any], **sections: Any
) -> Manifest:
    """The manifest (lora_ft.json): what made the adapter. `data` and `sections` are what the task adds."""
    splits = {split: len(run.splits[split]) for split in SPLITS}
    data = {"path": str(run.data_path), "sha256": sha256_file(run.data_path), "seed": run.config.seed} | data
    return Manifest(
        task=run.task,
        created=now_iso(),
        config=run.config.to_dict(),
        base=run.base_info,
        lora=methods.section(model, run.config),
        data=data | {"split_sizes": splits},
        metrics=metrics,
        training=training_section(trainer, run.precision),
        versions=adapters.library_versions(),
        **sections,
    )


def save(
    run: Start,
    folder: Path,
    model: PeftModel,
    manifest: Manifest,
    trainer: Trainer,
    adapter_names: list[str] | None = None,
) -> None:
    """From the main process: PEFT's adapter (of several on the model, those in `adapter_names`), the tokenizer, the
    manifest and the loss plot into `folder`. Every process calls it: sharded weights are gathered first, which takes
    all of them."""
    state = gathered_state(trainer.model_wrapped, trainer.accelerator)
    if run.processes.is_main_process:
        how = methods.save_kwargs(folder) | ({"selected_adapters": adapter_names} if adapter_names else {})
        adapters.save_adapter(model, run.tokenizer, folder, state, **how)
        methods.finish_conversion(model, folder)
        adapter_config.record(folder, manifest)
        adapters.write_manifest(folder, manifest)
        plots.plot_loss(trainer.state.log_history, folder / "loss.png")


def cpu_only() -> bool:
    """No GPU (or other accelerator). Trainer must then be told to use the CPU: otherwise the processes that torchrun
    or `accelerate launch` start each train alone on all the data, instead of together over gloo."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator else torch.cuda.is_available())


def processes() -> PartialState:
    """The processes of this run: just this one, or all those that torchrun or `accelerate launch` started."""
    return PartialState(cpu=cpu_only())


class Resumable:
    """What lora_ft adds to Trainer and SFTTrainer: a data order a resumed run repeats, a clean stop on SIGINT or
    SIGTERM, and counts of the tokens of every training batch, real (attention mask) and with padding, to show
    what dynamic padding and length grouping save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted_tokens: list[tuple[int, int]] = []  # this process's batches, in order (bench fits to them)
        self.add_callback(Tally())  # type: ignore[attr-defined]
        self.add_callback(StopOnSignal())  # type: ignore[attr-defined]
        # Trainer's own display prints raw dicts (PrinterCallback) unless its bars are on; lora_ft shows its own.
        self.remove_callback(PrinterCallback)  # type: ignore[attr-defined]
        self.add_callback(ShowProgress())  # type: ignore[attr-defined]
        checkpoints = Path(self.args.output_dir)  # type: ignore[attr-defined]
        if checkpoints.name == runs.CHECKPOINTS:  # a run folder's (bench trains into a temporary folder)
            log_path = checkpoints.parent / runs.PROGRESS_LOG
            self.add_callback(ProgressLog(log_path, lambda: find_callback(self, Tally)))  # type: ignore[attr-defined]
        for callback in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
                # beside the checkpoints, in the run folder: kept in the adapter folder, checkpoints are not
                callback.logging_dir = str(Path(self.args.output_dir).parent / "tensorboard")  # type: ignore[attr-defined]

    def evaluate(self, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any) -> dict[str, float]:
        # the bar names the split it runs over: prefer evaluates its test pairs through here too
        split = "val" if metric_key_prefix == "eval" else metric_key_prefix
        find_callback(self, ShowProgress).desc = f"evaluating on {split}"  # type: ignore[arg-type]
        return super().evaluate(*args, metric_key_prefix=metric_key_prefix, **kwargs)  # type: ignore[misc]

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


def labelled_positions_loss(
    trainer: Trainer, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None, return_outputs: bool = False
) -> Any:
    """SFTTrainer's loss (mean cross-entropy of the trained next tokens) with the LM head run only at the positions
    whose next token is trained: transformers' `logits_to_keep` as a mask, in the run's compute dtype. TRL 1.16's
    fused head does that on GPUs; on a CPU it scores every position, its products in float32, and the head (49k or
    50k rows) is then much of an instruct step. A prompt's positions are most of a row here."""
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100
    rest = {key: value for key, value in inputs.items() if key != "labels"}
    outputs = model(**rest, use_cache=False, logits_to_keep=keep)
    total = torch.nn.functional.cross_entropy(outputs.logits.float(), targets[targets != -100], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients across processes
    return (loss, outputs) if return_outputs else loss


def on_cpu(model: Any) -> bool:
    return next(model.parameters()).device.type == "cpu"


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
    check_reporting(config.report_to)
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
        report_to=config.report_to,
        disable_tqdm=True,  # see ShowProgress
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),
        ddp_find_unused_parameters=False,  # LoRA and the head are used in every forward pass
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=config.activation_checkpointing,  # TRL's SFTConfig turns it on unless told
        # non-reentrant, as torch recommends: it needs no input that requires gradients (the base is frozen)
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    return args_class(**arguments | extra)


def check_reporting(report_to: str) -> None:
    """--report-to names an integration whose package is installed (before training starts, not after)."""
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    needs = {"tensorboard": (is_tensorboard_available, "tensorboard"), "wandb": (is_wandb_available, "wandb")}
    if report_to in needs and not needs[report_to][0]():
        raise UserError(f"`report_to` {report_to}: needs the '{needs[report_to][1]}' package (pip install it)")


def gathered_state(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, on the CPU, when they are sharded across the processes (FSDP, ZeRO-3): each
    process holds a slice of every tensor, so saving a process's own would write slices. Every process must call
    it (gathering is collective). None where the model holds its weights whole, as with DDP or one process."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)  # ZeRO-3 gathers its partitions; ZeRO-1/2 keep weights whole
    if not any(isinstance(p, DTensor) for p in model.parameters()) and not isinstance(model, FSDP1):
        return None
    # torch's own API for FSDP1 and FSDP2 alike; the names come back as the unwrapped model's
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_sharding() -> None:
    """An accelerate config that asks for sharding (FSDP, DeepSpeed) on a machine without GPUs. accelerate (1.15)
    shards on GPUs and other accelerators only: on CPU processes its FSDP plugin fails deep inside (FSDP1), or it
    trains data-parallel without a word (FSDP2, DeepSpeed). torch's FSDP itself runs on CPUs (the tests use it)."""
    for variable, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() == "true" and cpu_only():
            raise UserError(
                f"the accelerate config asks for {kind}, which accelerate runs on GPUs only; "
                "on CPUs use recipes/accelerate/ddp.yaml (data-parallel over gloo)"
            )


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
        checkpoint = runs.newest_checkpoint(Path(trainer.args.output_dir).parent)
        raise Interrupted(signum, trainer.state.global_step, checkpoint)


def _restore(trainer: Trainer, state: TrainerState, checkpoint: Path) -> None:
    """Where a run that finished training (and then failed) left off: its `state` (read from `checkpoint`), counts,
    and the best (else the last) checkpoint's weights."""
    trainer.state = state
    tally = find_callback(trainer, Tally)
    for name, value in trainer.state.stateful_callbacks.get("Tally", {}).get("args", {}).items():
        setattr(tally, name, value)
    tally.resumed_at.append(trainer.state.global_step)
    best = Path(trainer.state.best_model_checkpoint or checkpoint)
    if isinstance(trainer.model, PeftModel):
        set_peft_model_state_dict(trainer.model, load_file(best / SAFETENSORS_WEIGHTS_NAME))
    else:  # full fine-tuning: the checkpoint holds the whole model, but for weights tied to others (GPT-2's lm_head)
        missing, unexpected = trainer.model.load_state_dict(load_file(best / SAFE_WEIGHTS_NAME), strict=False)
        tied = {name for name in missing if name.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise UserError(f"{best}: not a checkpoint of this model ({(unexpected or missing)[0]} differs)")


def peak_memory() -> dict[str, int | None]:
    """This process's peak resident memory (of a resumed run: since it resumed), and the GPU's peak allocation."""
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": gpu}


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
        "parallelism": trainer.accelerator.distributed_type.value,  # NO, MULTI_CPU/MULTI_GPU (DDP), FSDP, DEEPSPEED
        "global_batch_size": args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "precision": precision,
        "tokens": {"real": real, "with_padding": total, "real_share": round(real / total, 4) if total else None},
        "tokens_per_second": round(real * args.world_size / seconds, 1) if seconds else None,
        **peak_memory(),
        "log_history": state.log_history,
    }
