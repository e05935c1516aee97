"""Benchmark of a task's LoRA training (spam by default, or instruct) on the GPT-2-124M architecture (random weights,
the real GPT-2 tokenizer, the task's real training split): lora_ft's default path against a naive baseline (fp32,
every input padded to the longest training input, no length grouping) and against full fine-tuning. Each setup runs
in its own process, so that its peak memory is its own. The task module gives the training rows and their collator
(`bench_data`); the model is the task's Auto class on GPT-2's config."""

from __future__ import annotations

import math
import multiprocessing
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import TaskType
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

from ..core import files, registry
from ..core.config import BENCH_MODELS, load_config, task_defaults
from ..core.errors import UserError
from ..engine import callbacks, hardware, methods, models, training
from ..tasks import task_code
from . import course


def bench_config(model: str, tokenizer: PreTrainedTokenizerBase, architecture: dict[str, Any] | None) -> Any:
    """The transformers config `bench` trains: `model`'s architecture, `architecture`'s keys on top (tests)."""
    if model not in BENCH_MODELS:
        raise UserError(f"`model` {model!r}: bench builds {', '.join(BENCH_MODELS)}")
    name, keys = BENCH_MODELS[model]
    return getattr(transformers, name)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **keys | (architecture or {})
    )


@dataclass(frozen=True)
class Setup:
    name: str
    description: str
    lora: bool
    precision: str  # as --precision takes it
    pad_to_longest: bool  # every input padded to one width, the longest training input (the course's); else per batch
    group_by_length: bool
    warmup_steps: int
    timed_steps: int | None  # None: the rest of one whole epoch
    model_dropout: float | None = None  # None: as GPT-2 ships (0.1)
    lora_dropout: float = 0.05
    activation_checkpointing: bool = False
    compile: bool = False
    engine_choices: bool = (
        True  # the base held, and attention chosen, as lora_ft's loaders do (lora_ft.engine.hardware)
    )


def setups(quick: bool, task: str = "spam") -> list[Setup]:
    """(a) lora_ft's defaults (the task's recipe's), (b) the naive baseline, (c) full fine-tuning on the default path
    (for memory)."""
    recipe = task_defaults(task)
    lora_ft = Setup(
        name="lora_ft",
        description="LoRA, precision auto, dynamic padding, length-grouped, dropout as the recipe",
        lora=True,
        precision="auto",
        pad_to_longest=False,
        group_by_length=True,
        warmup_steps=3,
        timed_steps=20 if quick else None,
        model_dropout=recipe["model_dropout"],
        lora_dropout=recipe["lora_dropout"],
    )
    naive = replace(  # what a first script does: the model as it loads, PEFT's usual example settings
        lora_ft,
        name="naive",
        description="LoRA, fp32, every input padded to one width, random order, GPT-2's dropout 0.1",
        precision="fp32",
        pad_to_longest=True,
        group_by_length=False,
        warmup_steps=2,
        timed_steps=12 if quick else None,  # alike in size, but their times vary by a quarter
        model_dropout=None,
        lora_dropout=0.05,
        engine_choices=False,
    )
    # The same steps as lora_ft: peak RSS creeps up with the steps run (the allocator keeps freed memory).
    full = replace(lora_ft, name="full", description="full fine-tuning, otherwise as lora_ft", lora=False)
    checkpointed = replace(
        lora_ft, name="lora_ckpt", description="lora_ft with --activation-checkpointing", activation_checkpointing=True
    )
    # Its warm-up steps pay for the compile (whole epochs include it); `warmup_seconds` shows what it cost.
    compiled = replace(lora_ft, name="lora_compile", description="lora_ft with --compile", compile=True)
    return [lora_ft, naive, full, checkpointed, compiled]


class StepTimer(TrainerCallback):
    """Records when each optimiser step ends (data loading, forward, backward, update)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = 0.0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def durations(self) -> list[float]:
        return np.diff([self.start, *self.ends]).tolist()


def flops_per_token(trainer: Any, batch: dict[str, torch.Tensor], precision: str) -> float:
    """FLOPs of one forward + backward pass per (padded) token, counted by torch on `batch` (one row of the training
    data, so that counting does not raise the peak memory measured) through the trainer's own loss. It counts what
    autograd runs: LoRA computes no gradients for the frozen weights, full fine-tuning does; a fused LM head
    (instruct) projects only the labelled positions."""
    from torch.utils.flop_counter import FlopCounterMode

    model = trainer.model
    device = next(model.parameters()).device
    dtype = hardware.compute_dtype(precision)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        trainer.compute_loss(model, {k: v.to(device) for k, v in batch.items()}).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["input_ids"].numel()


def matmul_shapes(hidden: int = 768, intermediate: int | None = None, tokens: int = 2048) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of a block's projections (GPT-2's c_attn, attention c_proj, c_fc, MLP c_proj; a Llama's
    fused-size q/k/v, o, up, down): the products that make up nearly all of a step's FLOPs."""
    intermediate = intermediate or 4 * hidden
    return [
        (tokens, hidden, 3 * hidden),
        (tokens, hidden, hidden),
        (tokens, hidden, intermediate),
        (tokens, intermediate, hidden),
    ]


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]], budget: float = 1.0) -> dict[str, Any]:
    """The machine's own ceiling for `dtype`: the best GFLOP/s of a plain matrix product at the model's shapes, each
    timed for about `budget` seconds (at least twice). The MFU of a setup is measured against the peak of the
    precision it ran, on the device it ran (the CPU's threads as torch uses them, or the GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best: dict[str, float] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        times = []
        while len(times) < 2 or (sum(times) < budget and len(times) < 50):
            start = _now(device)
            torch.mm(a, b)
            times.append(_now(device) - start)
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / min(times[1:]) / 1e9  # the first may pay for warm-up
    return {"gflops_per_second": max(best.values()), "by_shape": best, "dtype": str(dtype).removeprefix("torch.")}


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def seconds_per_epoch(durations: list[float], tokens: list[int], epoch_tokens: list[int]) -> float:
    """A whole epoch from the timed steps: a least-squares fit of seconds = a + b * tokens per step (length-grouped
    batches vary in width), summed over the epoch's batches; a plain mean when the timed steps are all one size."""
    if len(set(tokens)) < 3:
        return float(np.mean(durations)) * len(epoch_tokens)
    b, a = np.polyfit(tokens, durations, 1)
    return float(a * len(epoch_tokens) + b * sum(epoch_tokens))


def load_tokenizer(spec: str | None) -> PreTrainedTokenizerBase:
    """A tokenizer folder (a bare vocab.json + merges.txt will do) or a Hub id / alias; by default the GPT-2
    tokenizer shipped with lora_ft."""
    spec = spec or str(files.GPT2_TOKENIZER)
    path = Path(spec).expanduser()
    source = models.ModelSource(spec, "local", str(path.resolve())) if path.is_dir() else models.resolve_model(spec)
    try:
        return models.load_tokenizer(source)
    except UserError as e:
        raise UserError(f"`tokenizer` {spec}: {e}; pass `tokenizer` FOLDER with the GPT-2 tokenizer files") from None


def measure(
    setup: Setup,
    tokenizer: str | None,
    data: str | None,
    seed: int,
    architecture: dict[str, Any] | None = None,
    task: str = "spam",
    bench_model: str = "gpt2",
) -> dict[str, Any]:
    """Train `setup` on `task`'s data for its steps in this process and measure it; run it in a fresh process (see
    `run`). The model is `bench_model`'s architecture (`BENCH_MODELS`), `architecture` on top (tests)."""
    entry, code = registry.get(task), task_code.get(task)
    config = _bench_recipe(task, setup, data, seed)
    _, splits = code.load_splits(config)
    tok = load_tokenizer(tokenizer)
    precision = hardware.resolve_precision(setup.precision)
    set_seed(seed)
    model = _bench_model(setup, entry, config, tok, precision, bench_model, architecture)
    train, collator = code.bench_data(splits["train"], tok, config, setup.pad_to_longest)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    steps = steps_per_epoch if setup.timed_steps is None else setup.warmup_steps + setup.timed_steps
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = training.training_args(
            config,
            Path(tmp),
            len(train),
            "loss",
            precision,
            max_steps=steps,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            train_sampling_strategy="group_by_length" if setup.group_by_length else "random",
            disable_tqdm=True,
            logging_steps=steps,
        )
        # The task's own Trainer: instruct's rows are tokenized and masked as SFTTrainer does (instruct.encode), and
        # its loss is SFTTrainer's, so a step computes what lora_ft's SFT step computes, without TRL's preprocessing.
        trainer_class = code.bench_trainer(model, setup.pad_to_longest)
        trainer = trainer_class(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[timer])
        batches = list(trainer.get_train_dataloader())
        epoch = [callbacks.batch_tokens(batch) for batch in batches]
        trainer.remove_callback(PrinterCallback)  # Trainer prints its logs when there is no progress bar
        # FLOPs per token of a typical row (the median-length one), as padded in this setup
        median = sorted(range(len(train)), key=lambda i: len(train[i]["input_ids"]))[len(train) // 2]
        flops = flops_per_token(trainer, dict(collator([train[median]])), precision)
        if setup.compile:  # after counting, which runs the blocks under a dispatch mode
            training.compile_blocks(model)
        trainer.train()
    timings = _timings(setup, timer.durations(), trainer.counted_tokens, epoch)
    real, padded = sum(r for r, _ in epoch), sum(t for _, t in epoch)
    result = {
        **asdict(setup),
        "precision_run": precision,
        "device": str(args.device),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "task": task,
        "bench_model": bench_model,
        "pad_to": max(batch["input_ids"].shape[1] for batch in batches) if setup.pad_to_longest else None,
        **timings,
        "steps_per_epoch": steps_per_epoch,
        "real_tokens_per_epoch": real,
        "padded_tokens_per_epoch": padded,
        "real_token_share": real / padded,
        "real_tokens_per_second": real / timings["seconds_per_epoch"],
        "flops_per_padded_token": flops,
        "gflops_per_second": flops * padded / timings["seconds_per_epoch"] / 1e9,
        "peak_rss_bytes": files.peak_rss_bytes(),
    }
    if torch.cuda.is_available():
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _bench_recipe(task: str, setup: Setup, data: str | None, seed: int) -> Any:
    """The task's GPT-2 recipe with the setup's method, dropout and checkpointing."""
    overrides = {"model": "gpt2", "data": data, "seed": seed, "lora_dropout": setup.lora_dropout}
    overrides["activation_checkpointing"] = setup.activation_checkpointing
    overrides["method"] = "lora" if setup.lora else "full"
    return load_config(task, overrides=overrides)


def _bench_model(
    setup: Setup,
    entry: registry.Task,
    config: Any,
    tokenizer: PreTrainedTokenizerBase,
    precision: str,
    bench_model: str,
    architecture: dict[str, Any] | None,
) -> Any:
    """The task's Auto class on `bench_model`'s architecture, random weights, held as lora_ft's loaders hold a base
    (models._load_base) unless the setup is a naive one, with the setup's method attached."""
    model: Any = getattr(transformers, entry.model_class).from_config(
        bench_config(bench_model, tokenizer, architecture)
    )
    models.set_dropout(model, setup.model_dropout)
    if setup.engine_choices:
        if hardware.holds_base_in_bf16(precision, methods.trains_base(config), None):
            model = hardware.hold_in_bf16(model)
        hardware.choose_attention(model)
    return methods.wrap(model, TaskType[entry.peft_task_type], config)


def _timings(setup: Setup, durations: list[float], counted: list, epoch: list[tuple[int, int]]) -> dict[str, Any]:
    """Steps run and timed, and seconds per step and per epoch (the whole epoch, or fitted from the timed steps)."""
    timed = slice(setup.warmup_steps if setup.timed_steps else 0, None)
    padded = [t for _, t in epoch]
    found = {
        "steps_run": len(durations),
        "steps_timed": len(durations[timed]),
        "warmup_seconds": sum(durations[: setup.warmup_steps]),
        "seconds_per_step": float(np.mean(durations[timed])),
        "seconds_per_epoch": seconds_per_epoch(durations[timed], [t for _, t in counted[timed]], padded),
        "epoch_measured_whole": setup.timed_steps is None,
    }
    if setup.timed_steps is None and len(durations) > 23:  # how well --quick's estimate would have done
        first = slice(3, 23)
        found["seconds_per_epoch_from_steps_3_to_23"] = seconds_per_epoch(
            durations[first], [t for _, t in counted[first]], padded
        )
    return found


def machine() -> dict[str, Any]:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_native_bf16": hardware.cpu_has_native_bf16(),
        "torch": torch.__version__,
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        info["cpu"] = names[0] if names else info["cpu"]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure_course(
    quick: bool,
    tokenizer: str | None,
    data: str | None,
    seed: int,
    architecture: dict[str, Any] | None = None,
    task: str = "spam",
) -> dict[str, Any]:
    """The course's own LoRA code (`course.py`) on lora_ft's training split of `task` (one whose module has the
    course as its `COURSE_PEER`), batch size and rank; run it in a fresh process, as `measure`."""
    config = load_config(task, overrides={"model": "gpt2", "data": data, "seed": seed})
    _, splits = task_code.get(task).load_splits(config)
    train = splits["train"]
    names = {"n_layer": "n_layers", "n_embd": "emb_dim", "n_head": "n_heads", "n_positions": "context_length"}
    result = course.measure(
        list(train["text"]),
        list(train["label"]),
        load_tokenizer(tokenizer),
        batch_size=config.batch_size,
        rank=config.lora_r,
        timed_steps=12 if quick else None,
        architecture={names.get(key, key): value for key, value in (architecture or {}).items()},
        seed=seed,
    )
    version = result["llms_from_scratch_version"]
    description = f"the course's LoRA code (llms-from-scratch {version}), fp32, padded to {result['pad_to']}"
    real = result["real_tokens_per_epoch"] / result["seconds_per_epoch"]
    return result | {
        "description": description,
        "precision_run": "fp32",
        "epoch_measured_whole": not quick,
        "real_tokens_per_second": real,
    }


def mfu(result: dict[str, Any], peaks: dict[str, float]) -> float | None:
    """Model-FLOP utilisation: the FLOPs the data needs (counted FLOPs per token times the *real* tokens of an epoch:
    work on padding is waste) per second, over the matmul peak of the precision the setup ran."""
    peak = peaks.get(result["precision_run"])
    return (
        result["flops_per_padded_token"] * result["real_tokens_per_epoch"] / result["seconds_per_epoch"] / 1e9 / peak
        if peak
        else None
    )


def matmul_peaks(shape: Any) -> dict[str, float]:
    """The machine's measured matmul peak in GFLOP/s, by precision (fp16 on a GPU only), on the matrix sizes of the
    transformers config `shape`."""
    hidden, intermediate = shape.hidden_size, getattr(shape, "intermediate_size", None) or shape.n_inner
    precisions = {"fp32": torch.float32, "bf16": torch.bfloat16} | (
        {"fp16": torch.float16} if torch.cuda.is_available() else {}
    )
    shapes = matmul_shapes(hidden, intermediate)
    return {name: matmul_peak(dtype, shapes)["gflops_per_second"] for name, dtype in precisions.items()}


def run(
    quick: bool = False,
    tokenizer: str | None = None,
    data: str | None = None,
    seed: int = 123,
    initializer: Callable[[], None] | None = None,
    architecture: dict[str, Any] | None = None,
    task: str = "spam",
    bench_model: str = "gpt2",
) -> dict[str, Any]:
    """Measure the machine's matmul peaks, then every setup of `task` on `bench_model`'s architecture and the
    course's code (when installed, and where the task and model have it as a peer), each in a fresh process (started
    with `initializer`), and compare: lora_ft's speedup over the naive path and over the course (seconds per epoch),
    its model-FLOP utilisation, and its peak memory against full fine-tuning."""
    peaks = matmul_peaks(bench_config(bench_model, load_tokenizer(tokenizer), architecture))  # a bad model fails here
    results = {}
    jobs: dict[str, Callable[[], Any]] = {
        s.name: partial(measure, s, tokenizer, data, seed, architecture, task, bench_model) for s in setups(quick, task)
    }
    missing = course.available() if task_code.get(task).COURSE_PEER else f"the course has no LoRA code for {task}"
    if bench_model != "gpt2":
        missing = "the course's LoRA code builds GPT-2 only"
    if missing is None:
        jobs["course"] = partial(measure_course, quick, tokenizer, data, seed, architecture, task)
    for name, job in jobs.items():
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, context, initializer) as worker:
            results[name] = worker.submit(job).result()
    described = f"{bench_model} architecture{f' {architecture}' if architecture else ''}, random weights"
    return summarise(
        results, peaks, {"quick": quick, "task": task, "model": described, "bench_model": bench_model}, missing
    )


def summarise(
    results: dict[str, dict[str, Any]], peaks: dict[str, float], run: dict[str, Any], missing: str | None
) -> dict[str, Any]:
    """The report on `results` (by setup name; "course" among them unless `missing` says why not): each setup's MFU
    of `peaks` (matmul GFLOP/s by precision), lora_ft's ratios to the others, after `run` (what was benchmarked)."""
    for result in results.values():
        result["mfu"] = mfu(result, peaks)
    memory = "peak_cuda_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    ours = results["lora_ft"]
    return run | {
        "machine": machine() | {"matmul_peak_gflops_per_second": peaks},
        "setups": results,
        "mfu": ours["mfu"],
        "speedup_vs_naive": results["naive"]["seconds_per_epoch"] / ours["seconds_per_epoch"],
        "speedup_vs_course": results["course"]["seconds_per_epoch"] / ours["seconds_per_epoch"]
        if "course" in results
        else None,
        "course_missing": missing,
        "peak_rss_ratio_lora_vs_full": ours["peak_rss_bytes"] / results["full"]["peak_rss_bytes"],
        "peak_memory_ratio_lora_vs_full": ours[memory] / results["full"][memory],
        # what --activation-checkpointing trades: memory saved against time lost, both as ratios to lora_ft
        "checkpointing_memory_ratio": results["lora_ckpt"][memory] / ours[memory],
        "checkpointing_time_ratio": results["lora_ckpt"]["seconds_per_epoch"] / ours["seconds_per_epoch"],
        "compile_speedup": ours["seconds_per_epoch"] / results["lora_compile"]["seconds_per_epoch"],
    }
