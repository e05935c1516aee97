"""Preference tuning: DPO through TRL's DPOTrainer, continuing an instruct adapter (`from_adapter`) or new LoRA on the
base, against a frozen reference that is the starting point. No second copy of the base is loaded: the starting
adapter is held twice on the one PEFT base (TRL copies it as adapter "ref", frozen), or for new LoRA the adapter is
switched off. Measured on the held-out test pairs before and after: DPO loss, reward accuracy and margin, and the
greedy answers to the test prompts scored by ROUGE-L against the chosen and against the rejected answer."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from peft import PeftModel, TaskType
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from .. import data
from ..core import plots, registry, report
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.files import sha256_file
from ..core.manifest import Manifest
from ..core.stats import mean_interval
from ..data import chat, pairs
from ..engine import adapter_config, adapters, generation, hardware, methods, models, runs, training
from . import instruct

log = logging.getLogger("lora_ft")

RESPONSES = instruct.RESPONSES
COURSE_PEER = False  # the course's DPO (chapter 7's bonus) trains every weight: no LoRA code to compare with
SAMPLE_TEXTS = instruct.SAMPLE_TEXTS
EVAL_COLUMNS: tuple[str, ...] = ()  # `eval` does not score a prefer adapter again (see score_test)
PAIRED: dict[str, tuple[str, tuple[str, ...]]] = {}
REFERENCE = "ref"  # TRL's name for the frozen copy of the starting adapter
POLICY = "default"  # the trained adapter (PEFT's first adapter name)
MARGINS_PLOT = "reward_margin.png"
NOT_BENCHED = "`bench` measures one-sequence training (spam, instruct); DPO's paired passes are not measured"
# What a starting adapter decides of the run: it is continued as it is, on its own base.
FROM_START = ("model", "method", "lora_r", "lora_alpha", "use_rslora", "target_modules", "quantize")


def load_splits(
    config: RunConfig, fractions: tuple[float, float, float] = data.INSTRUCTION_FRACTIONS
) -> tuple[Path, DatasetDict]:
    """The data file and its split: `data.instruction_splits`, as instruct splits. The course's preference file holds
    the instruction data's records in the same order, so the same seed puts the same records in each split.
    Degenerate pairs are still in (dropped before them, they would shift every later record's split)."""
    path = data.resolve_data_file(data.PREFERENCE_DATA, config.data)
    return path, data.instruction_splits(pairs.read_pairs(path), config.seed, fractions, path)


def starting_adapter(config: RunConfig) -> Manifest | None:
    """The manifest of the adapter `from_adapter` names (None without one), checked to be one DPO can continue."""
    if not config.from_adapter:
        return None
    folder = config.from_adapter
    manifest = adapters.read_manifest(folder)
    if manifest.task not in registry.TASKS or not registry.same_kind(manifest.task, "prefer"):
        raise UserError(f"`from_adapter` {folder}: a '{manifest.task}' adapter; prefer continues an instruct one")
    if adapters.is_whole_model(manifest):
        raise UserError(f"`from_adapter` {folder}: a fully fine-tuned model; prefer continues a PEFT adapter")
    given = config.model
    if given is not None and given != manifest.config["model"]:
        raise UserError(f"`model` {given}: `from_adapter` {folder} was trained on {manifest.config['model']}")
    adapter_config.check(folder, manifest)  # its files too, here before anything is loaded: told at once
    adapters.check_weights(folder)
    return manifest


def with_start(config: RunConfig, start: Manifest | None) -> RunConfig:
    """`config` with what the starting adapter decides (its base, method and shape), and its path made absolute."""
    if start is None:
        return config
    own = {key: start.config[key] for key in FROM_START if key in start.config}
    folder = str(Path(config.from_adapter).expanduser().resolve())
    return dataclasses.replace(config, **own, init_lora_weights="default", from_adapter=folder)


def _template(start: Manifest | None, splits: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The prompt format, as the manifest's `data` records it (`chat.described`): the starting adapter's (its chat
    template given to the tokenizer); else, for conversations or a base whose tokenizer has a chat template of its own
    (SmolLM2's), the chat template; else Alpaca, or prompts as given."""
    if start is not None:
        if chat.trained_on_chat(start):
            tokenizer.chat_template = start.data["chat_template"]["template"]
            return {"prompt_template": chat.CHAT, "chat_template": start.data["chat_template"]}
        return {"prompt_template": start.data.get("prompt_template", "alpaca")}
    train = splits["train"]
    raw = not any(train["messages"]) and not any(train["instruction"])
    if not raw and (any(train["messages"]) or tokenizer.chat_template):
        return {"prompt_template": chat.CHAT, "chat_template": chat.use_template(tokenizer)}
    return {"prompt_template": "prompt as given" if raw else "alpaca"}


def _prompts(split: Dataset, template: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    shape = Manifest({"data": template})  # what `render_prompt` reads of an adapter's manifest
    return [chat.render_prompt(shape, tokenizer, pairs.request(row)) for row in split]


def _within_length(
    split: Dataset, prompts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, list[str], int]:
    """The pairs whose prompt and longer answer (with EOS) fit in `max_length` tokens, their prompts, and how many did
    not. TRL would cut the longer answer short instead, and compare a cut answer with a whole one."""
    eos = tokenizer.eos_token
    fits = [
        max(len(tokenizer(prompt + row[key] + eos)["input_ids"]) for key in pairs.ANSWERS) <= max_length
        for row, prompt in zip(split, prompts, strict=True)
    ]
    keep = [i for i, fit in enumerate(fits) if fit]
    return split.select(keep), [prompts[i] for i in keep], len(split) - len(keep)


class PreferTrainer(training.Resumable, DPOTrainer):
    pass


def build_trainer(
    config: RunConfig, model: Any, tokenizer: Any, train: Dataset, val: Dataset, output_dir: Path, precision: str
) -> DPOTrainer:
    """DPOTrainer on the standard preference format. `model` is the base (new LoRA from `peft_config`: the reference
    is the base, the adapter off) or the PEFT model holding the starting adapter (TRL copies it as "ref")."""
    args = training.training_args(
        config,
        output_dir,
        len(train),
        "loss",
        precision,
        DPOConfig,
        beta=config.beta,
        loss_type=[config.loss_type],
        max_length=config.max_length,
        train_sampling_strategy="random",  # DPO's rows are pairs: no single length to group by
    )
    hardware.fused_head_at_labelled_positions()
    lora = None if isinstance(model, PeftModel) else methods.peft_config(model, TaskType.CAUSAL_LM, config)
    return PreferTrainer(
        model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
        peft_config=lora,
    )  # fmt: skip


def preference_metrics(trainer: DPOTrainer, test: Dataset) -> dict[str, float]:
    """DPO loss, reward accuracy and margin (TRL's, mean over evaluation batches) on the test pairs."""
    found = trainer.evaluate(test, metric_key_prefix="test")
    names = {"loss": "test_loss", "reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins"}
    names |= {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected"}
    return {name: next(v for k, v in found.items() if k.endswith(key)) for name, key in names.items()}


def answer_metrics(
    model: Any, tokenizer: Any, test: Dataset, prompts: list[str], config: RunConfig, who: str
) -> tuple[dict[str, Any], list[generation.Generation]]:
    """Greedy answers to the test prompts, scored by ROUGE-L against the chosen and the rejected answer."""
    made = generation.generate(
        model, tokenizer, prompts, config.max_new_tokens, config.eval_batch_size, desc=f"answering test ({who})"
    )
    responses = [g.response for g in made]
    chosen = np.array(instruct.rouge_l(test["chosen"], responses))
    rejected = np.array(instruct.rouge_l(test["rejected"], responses))
    return {
        "rouge_l_chosen": float(chosen.mean()),
        "rouge_l_rejected": float(rejected.mean()),
        "rouge_l_gap": float((chosen - rejected).mean()),
        # Paired by prompt: each answer's own gap, so the interval is of the gap, not of two separate means.
        "rouge_l_gap_ci95": mean_interval(chosen - rejected),
        "eos_share": sum(g.stopped_at_eos for g in made) / len(made),
        "mean_new_tokens": sum(g.new_tokens for g in made) / len(made),
        "examples": len(made),
    }, made


def measure(trainer: DPOTrainer, model: Any, tokenizer: Any, test: Dataset, answered: Dataset, prompts: list[str],
            config: RunConfig, who: str) -> tuple[dict[str, Any], list[generation.Generation]]:  # fmt: skip
    scores, made = answer_metrics(model, tokenizer, answered, prompts, config, who)
    return preference_metrics(trainer, test) | scores, made


def best_val(trainer: DPOTrainer) -> dict[str, float]:
    """The val evaluation of the step kept (the lowest val DPO loss), from the trainer's log."""
    evaluated = [e for e in trainer.state.log_history if "eval_loss" in e]
    best = min(evaluated, key=lambda e: e["eval_loss"])
    names = {"loss": "eval_loss", "reward_accuracy": "eval_rewards/accuracies", "reward_margin": "eval_rewards/margins"}
    return {name: best[key] for name, key in names.items()} | {"step": best["step"]}


def parameters_in_memory(trainer: DPOTrainer) -> int:
    """Elements of every distinct parameter tensor the trainer holds, the reference model's included."""
    held = [trainer.model, *([trainer.ref_model] if trainer.ref_model is not None else [])]
    unique = {id(p): p.numel() for model in held for p in model.parameters()}
    return sum(unique.values())


def train(config: RunConfig, overwrite: bool = False, resume: Path | None = None) -> adapters.TrainResult:
    """DPO with LoRA and write the adapter folder; returns the folder, manifest and trained model (its adapter "ref",
    when it started from an adapter, the frozen reference)."""
    start = starting_adapter(config)
    config = with_start(config, start)
    run = training.start("prefer", config, overwrite, resume, load_splits, _new_base)
    config, tokenizer = run.config, run.tokenizer
    dropped = {name: sum(map(pairs.degenerate, split)) for name, split in run.splits.items()}
    if any(dropped.values()):
        log.info("left out %d pairs whose answers are identical or empty (%s)", sum(dropped.values()), dropped)
    splits = DatasetDict(
        {name: split.filter(lambda row: not pairs.degenerate(row)) for name, split in run.splits.items()}
    )
    template = _template(start, splits, tokenizer)
    kept, too_long = {}, {}
    for name, split in splits.items():
        rows, prompts, too_long[name] = _within_length(
            split, _prompts(split, template, tokenizer), tokenizer, config.max_length
        )
        kept[name] = (rows, prompts)
        if len(rows) == 0:
            raise UserError(
                f"{run.data_path}: no {name} pair is left that fits in `max_length` {config.max_length} tokens"
            )
    train_set, val_set, test_set = (pairs.as_dataset(*kept[name]) for name in data.SPLITS)
    val_set = training.val_sample(val_set, config)
    limit = min(config.test_limit or len(test_set), len(test_set))
    answered, answered_prompts = kept["test"][0].select(range(limit)), kept["test"][1][:limit]

    with training.run_folder(run, overwrite, resume) as tmp:
        trainer = build_trainer(config, run.base, tokenizer, train_set, val_set, tmp / runs.CHECKPOINTS, run.precision)
        methods.keep_initial(trainer.model, config, tmp / methods.INITIAL_ADAPTER)
        before, _ = measure(trainer, trainer.model, tokenizer, test_set, answered, answered_prompts, config, "start")
        training.fit(trainer, resume)
        model: PeftModel = training.trained_model(trainer)
        after, generations = measure(trainer, model, tokenizer, test_set, answered, answered_prompts, config, "tuned")
        metrics = {"val": best_val(trainer), "test_start": before, "test": after}
        metrics["parameters_in_memory"] = parameters_in_memory(trainer)
        described = {
            "fractions": list(data.INSTRUCTION_FRACTIONS),
            "dropped_degenerate": dropped,
            "dropped_longer_than_max_length": too_long,
            "val_evaluated": len(val_set),
            "test_pairs": len(test_set),
            "test_examples_generated": limit,
            **template,
        }
        generation = {
            "greedy": True,
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.eval_batch_size,
            "stops_at": tokenizer.eos_token,
        }
        section = preference_section(config, start, trainer)
        manifest = training.manifest(run, trainer, model, described, metrics, generation=generation, preference=section)
        training.save(run, tmp, model, manifest, trainer, adapter_names=[POLICY])
        if run.processes.is_main_process:
            plots.plot_metric(trainer.state.log_history, "rewards/margins", "reward margin", tmp / MARGINS_PLOT)
            records = [
                {
                    **pairs.request(row),
                    "chosen": row["chosen"],
                    "rejected": row["rejected"],
                    "model_response": g.response,
                }
                for row, g in zip(answered, generations, strict=True)
            ]
            (tmp / RESPONSES).write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return adapters.TrainResult(run.output, manifest, model)


def preference_section(config: RunConfig, start: Manifest | None, trainer: DPOTrainer) -> dict[str, Any]:
    """The manifest's `preference` section: the starting adapter (path, the sha256 of its weights), the reference
    and the DPO settings."""
    started = None
    if start is not None:
        weights = Path(config.from_adapter) / "adapter_model.safetensors"
        started = {"path": config.from_adapter, "task": start.task, "adapter_sha256": sha256_file(weights)}
    reference = (
        f"the starting adapter, frozen (PEFT adapter '{REFERENCE}' on the same base)"
        if start
        else ("the base (the adapter switched off)")
    )
    return {
        "start": started,
        "reference": reference,
        "separate_reference_model": trainer.ref_model is not None,
        "beta": config.beta,
        "loss_type": config.loss_type,
    }


def _new_base(
    source: models.ModelSource, tokenizer: Any, splits: DatasetDict, config: RunConfig, precision: str
) -> Any:
    """The base, with the starting adapter on it, trainable, when there is one (checked to be the base it was
    trained on)."""
    start = starting_adapter(config)
    base = models.load_causal_base(source, tokenizer, config.quantize, precision)
    if start is None:
        return base
    mismatches = models.base_mismatches(start.base, models.describe_base(source, base))
    if mismatches:
        raise UserError(f"`from_adapter` {config.from_adapter}: not this base's adapter ({'; '.join(mismatches)})")
    with adapters.peft_loading(config.from_adapter, source.spec):
        return PeftModel.from_pretrained(base, config.from_adapter, adapter_name=POLICY, is_trainable=True)


# A prefer adapter is an instruction-following causal LM: it loads and answers as an instruct one
# (`registry.same_kind`).
load = instruct.load
respond = instruct.respond


def check_texts(manifest: Manifest, count: int) -> list[str]:
    """Prompt + chosen answer of the first `count` test pairs, in the template the adapter was trained with."""
    test = load_splits(manifest.run_config)[1]["test"].filter(lambda row: not pairs.degenerate(row))
    test = test.select(range(min(count, len(test))))
    tokenizer = models.load_tokenizer(models.source_from_manifest(manifest.base))
    if chat.trained_on_chat(manifest):
        tokenizer.chat_template = manifest.data["chat_template"]["template"]
    return [p + row["chosen"] for p, row in zip(_prompts(test, manifest.data, tokenizer), test, strict=True)]


def bench_data(train: Dataset, tokenizer: Any, config: RunConfig, pad_to_longest: bool) -> tuple[Any, Any]:
    raise UserError(NOT_BENCHED)


def bench_trainer(model: Any, pad_to_longest: bool) -> type:
    raise UserError(NOT_BENCHED)


def score_test(loaded: adapters.Loaded, test: Dataset, config: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    raise UserError(
        "`eval` scores spam and instruct adapters again; a prefer adapter's test figures need DPO's reference "
        "model: they are in its manifest's `metrics`"
    )


def summary(manifest: Manifest, folder: Path) -> list[str]:
    """A finished run for a person: the start against the tuned adapter on the test pairs, how it trained, what was
    left out, where it is."""
    section = manifest.preference
    start = section["start"]["path"] if section["start"] else "the base (new LoRA)"
    lines = [
        f"DPO ({section['loss_type']}, beta {section['beta']}) from {start}; reference: {section['reference']}",
        report.prefer_table(manifest.metrics),
        report.trained(manifest.training),
    ]
    for key, what in (("dropped_degenerate", "identical or empty answers"), ("dropped_longer_than_max_length",
                      f"longer than --max-length {manifest.config['max_length']} tokens")):  # fmt: skip
        if any(manifest.data[key].values()):
            lines.append(f"{what}, left out: {manifest.data[key]}")
    return [*lines, f"adapter: {folder}  (responses: {folder / RESPONSES}, plots: loss.png, {MARGINS_PLOT})"]
