"""Text classification (SMS spam vs. ham, or any labelled text): LoRA + a trained `score` head, HF Trainer."""

from __future__ import annotations

import hashlib
import itertools
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from peft import TaskType
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from .. import data
from ..core import plots, progress, registry, report, stats
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..engine import adapters, callbacks, methods, models, runs, training
from . import task_api

# Inputs for merge's check when the adapter's own data file is gone (see `check_texts`).
SAMPLE_TEXTS = [
    "WINNER!! You have been selected to receive a £900 prize reward! Call now to claim.",
    "Are we still on for dinner tonight? I'll be there at 7.",
    "URGENT: your account is suspended. Reply with your PIN to unlock it.",
    "Can you pick up some milk on the way home?",
]

COURSE_PEER = True  # the course's appendix-E LoRA code classifies SMS spam: `bench`'s peer (bench/course.py)
COURSE_WIDTH = 120  # the tokens the course pads every SMS to (`bench`'s naive baseline pads to it too)
EVAL_COLUMNS = report.METRIC_COLUMNS  # what `eval` shows
# `eval A B`'s paired tests (evaluation.compare_pair): accuracy by McNemar's exact test on each message right or
# wrong; the loss by a paired bootstrap of each message's log loss.
PAIRED = {"accuracy": ("mcnemar", ("correct",)), "loss": ("mean", ("log_loss",))}


@dataclass
class Prediction:
    text: str
    label: str
    score: float
    truncated: bool = False  # longer than the adapter's max_length: labelled from its first max_length tokens


def load_splits(
    config: RunConfig, fractions: tuple[float, float, float] = data.CLASSIFICATION_FRACTIONS
) -> tuple[Path, DatasetDict]:
    """The data file, and its (balanced) train/val/test split fixed by `config.seed`."""
    path = data.resolve_data_file(data.SMS_SPAM, config.data)
    rows = data.read_labeled(path)
    return path, data.classification_splits(rows, config.seed, config.balance, fractions, path)


def tokenize(dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Any:
    if isinstance(dataset, DatasetDict):
        return DatasetDict({name: tokenize(split, tokenizer, max_length) for name, split in dataset.items()})

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    # Without a fingerprint given, datasets makes one by pickling `encode` with the tokenizer in it: seconds of every
    # run (profiled), for a cache that these in-memory splits never use. This one names what the rows depend on.
    depends = f"{dataset._fingerprint} {tokenizer.name_or_path} {len(tokenizer)} {max_length}"
    fingerprint = hashlib.sha256(depends.encode()).hexdigest()[:16]
    return dataset.map(encode, batched=True, remove_columns=["text"], new_fingerprint=fingerprint)


def bench_data(train: Dataset, tokenizer: PreTrainedTokenizerBase, config: RunConfig, pad_to_longest: bool) -> tuple:
    """`bench`'s rows: the training texts tokenized as `train` tokenizes them, the collator padding per batch; or, for
    the naive baseline, every text cut and padded to the course's width (its code pads to the longest training
    message as it reads the file: 120 tokens)."""
    if not pad_to_longest:
        return tokenize(train, tokenizer, config.max_length), DataCollatorWithPadding(tokenizer)
    encoded = tokenize(train, tokenizer, COURSE_WIDTH)
    return encoded, DataCollatorWithPadding(tokenizer, padding="max_length", max_length=COURSE_WIDTH)


def bench_trainer(model: torch.nn.Module, pad_to_longest: bool) -> type[Trainer]:
    """The Trainer `bench` times: the one `train` uses."""
    return training.ClassifierTrainer


def longer(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[bool]:
    """Which texts are longer than `max_length` tokens: the model sees only their first `max_length`."""
    return [len(ids) > max_length for ids in tokenizer(list(texts))["input_ids"]]


def classification_metrics(labels: np.ndarray, logits: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (of label 1 for two classes, macro-averaged for more), loss, confusion; accuracy
    with its Wilson 95% interval and F1 with a bootstrap one over the examples (`stats`)."""
    predictions = logits.argmax(-1)
    ids = list(range(len(names)))
    average = "binary" if len(names) == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=ids, average=average, zero_division=0
    )
    probabilities = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "accuracy_ci95": stats.wilson(int((predictions == labels).sum()), len(labels)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "f1_ci95": stats.f1_interval(labels, predictions, len(names)),
        "loss": float(log_loss(labels, probabilities, labels=ids)),
        "positive_label": names[1] if average == "binary" else None,
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "examples": len(labels),
    }


def predict_logits(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, batch_size: int, desc: str = "scoring"
) -> np.ndarray:
    """Logits for every row of a tokenized dataset, in order (used at the end of training and by eval).
    Rows run shortest first, so that a batch pads to similar lengths; the result is put back in order."""
    order = _length_order(dataset)
    rows = dataset.select(order).remove_columns([c for c in dataset.column_names if c == "label"])
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
            use_cpu=training.cpu_only(),
        )
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[callbacks.PredictionProgress(desc)],
        )
        logits = _logits(trainer.predict(rows).predictions)
    return logits[np.argsort(order)]


def _logits(predictions: np.ndarray | tuple) -> np.ndarray:
    """Trainer's predictions are a tuple when the model returns more than logits; logits come first."""
    return predictions[0] if isinstance(predictions, tuple) else predictions


def _scalar_metrics(labels: np.ndarray, predictions: np.ndarray | tuple, names: list[str]) -> dict[str, float]:
    """What Trainer logs for each evaluation on val (and uses to pick the best epoch)."""
    metrics = classification_metrics(labels, _logits(predictions), names)
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def _length_order(dataset: Dataset) -> np.ndarray:
    return np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")


def train(config: RunConfig, overwrite: bool = False, resume: Path | None = None) -> adapters.TrainResult:
    """Train a LoRA classifier and write its adapter folder; returns the folder, manifest and trained model."""
    run = training.start("spam", config, overwrite, resume, load_splits, _new_base)
    config, tokenizer, splits = run.config, run.tokenizer, run.splits
    names = splits["train"].features["label"].names
    model = methods.wrap(run.base, TaskType.SEQ_CLS, config)
    encoded = tokenize(splits, tokenizer, config.max_length)
    encoded["val"] = training.val_sample(encoded["val"], config)

    with training.run_folder(run, overwrite, resume) as tmp:
        args = training.training_args(config, tmp / runs.CHECKPOINTS, len(encoded["train"]), "accuracy", run.precision)
        trainer = training.ClassifierTrainer(
            model=model,
            args=args,
            train_dataset=encoded["train"],
            eval_dataset=encoded["val"].select(_length_order(encoded["val"])),  # less padding, same metrics
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=lambda p: _scalar_metrics(p.label_ids, p.predictions, names),
        )
        methods.keep_initial(model, config, tmp / methods.INITIAL_ADAPTER)
        training.fit(trainer, resume)
        model = training.trained_model(trainer)
        metrics = {  # every process takes part: Trainer.predict shares the rows out and gathers the logits
            split: classification_metrics(
                np.array(encoded[split]["label"]),
                predict_logits(model, tokenizer, encoded[split], config.eval_batch_size, f"scoring {split}"),
                names,
            )
            for split in data.SPLITS
        }
        truncated = {split: sum(longer(splits[split]["text"], tokenizer, config.max_length)) for split in data.SPLITS}
        fractions = list(data.CLASSIFICATION_FRACTIONS)
        described = {"balanced": config.balance, "fractions": fractions, "truncated": truncated}
        described["val_evaluated"] = len(encoded["val"])
        labels = {name: i for i, name in enumerate(names)}
        manifest = training.manifest(run, trainer, model, described, metrics, labels=labels)
        training.save(run, tmp, model, manifest, trainer)
        if run.processes.is_main_process:
            title = f"test split, accuracy {metrics['test']['accuracy']:.1%}"
            plots.plot_confusion(metrics["test"]["confusion_matrix"], names, tmp / "confusion_matrix.png", title)
    return adapters.TrainResult(run.output, manifest, model)


def _new_base(
    source: models.ModelSource, tokenizer: Any, splits: DatasetDict, config: RunConfig, precision: str
) -> Any:
    """The classifier to train: a new head for the split's labels. GPT-2's classifier takes **kwargs but ignores
    num_items_in_batch (its loss is its own batch's mean): without `accepts_loss_kwargs = False`, Trainer multiplies
    that loss by the number of processes (logged loss and gradients N times too large)."""
    names = splits["train"].features["label"].names
    base = models.load_classifier_base(
        source, tokenizer, names, config.quantize, precision, methods.trains_base(config)
    )
    base.accepts_loss_kwargs = False
    return base


def load_base(
    source: models.ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
    quantize: str | None,
    precision: str,
) -> Any:
    """The classifier base an adapter goes on: its label names from the manifest, a new (untrained) head."""
    return models.load_classifier_base(source, tokenizer, manifest.label_names, quantize, precision)


load = adapters.loader("spam", load_base)  # TaskModule.load, on the classifier base above


CHUNK = 1024  # texts read, labelled and handed back at a time by `predict_stream`: what bounds its memory


def predict(adapter: str | Path, texts: list[str], batch_size: int = 32, force: bool = False) -> list[Prediction]:
    """Each text's label and score, and whether it was cut at the adapter's max_length (`predict_stream`, whole)."""
    return list(predict_stream(adapter, texts, batch_size, force))


def predict_stream(
    adapter: str | Path, texts: Iterable[str], batch_size: int = 32, force: bool = False
) -> Iterator[Prediction]:
    """`predict` for texts read as they come (a file of a million lines): CHUNK at a time, each chunk labelled in
    batches of similar lengths and yielded in order, so that memory is bounded and the first labels come out within
    seconds. An empty text is refused before its chunk is labelled (as `text N of M` when `texts` is a list)."""
    loaded = load(adapter, force=force)
    names, max_length = loaded.manifest.label_names, loaded.manifest.run_config.max_length
    total = f" of {len(texts)}" if isinstance(texts, list) else ""
    source, done = iter(texts), 0
    shown = progress.bar(desc="classifying", unit=" texts", hidden=isinstance(texts, list) and len(texts) <= batch_size)
    with shown:
        while chunk := list(itertools.islice(source, CHUNK)):
            empty = next((done + n for n, text in enumerate(chunk, 1) if not text.strip()), None)
            if empty is not None:
                raise UserError(f"text {empty}{total} is empty: there is nothing to classify")
            yield from _labelled(loaded.model, loaded.tokenizer, chunk, names, max_length, batch_size)
            done += len(chunk)
            shown.update(len(chunk))


def _labelled(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    names: list[str],
    max_length: int,
    batch_size: int,
) -> list[Prediction]:
    """`texts` labelled in batches of similar lengths (shortest first, which pads least), put back in order."""
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    labelled: dict[int, Prediction] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        found = classify_batch(model, tokenizer, [texts[i] for i in batch], names, max_length)
        labelled.update(zip(batch, found, strict=True))
    return [labelled[i] for i in range(len(texts))]


def classify_batch(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], names: list[str], max_length: int
) -> list[Prediction]:
    """`texts` labelled in one forward pass by an adapter already loaded (`serve`'s batches), padded on the right
    and cut at `max_length` tokens as `predict` does."""
    inputs = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs.to(next(model.parameters()).device)).logits.float().cpu()
    return _predictions(texts, logits, names, longer(texts, tokenizer, max_length))


def _predictions(texts: list[str], logits: torch.Tensor, names: list[str], cut: list[bool]) -> list[Prediction]:
    best = torch.softmax(logits, -1).max(-1)
    return [
        Prediction(text, names[i], float(p), c)
        for text, i, p, c in zip(texts, best.indices.tolist(), best.values.tolist(), cut, strict=True)
    ]


def evaluate(adapter: str | Path, force: bool = False) -> tuple[dict[str, Any], Manifest]:
    """Rebuild the adapter's test split from its manifest and recompute the test metrics, as `eval` does
    (`task_api.rescore`). Returns (recomputed test metrics, manifest)."""
    # This module scores its own adapters (`eval` finds the module through task_code, which sits above this one).
    manifest = adapters.read_manifest(adapter)
    if manifest.task not in registry.TASKS or not registry.same_kind(manifest.task, "spam"):
        raise UserError(f"{adapter}: a '{manifest.task}' adapter, not a spam one (`eval` scores any task's)")
    result = task_api.rescore(adapter, manifest, sys.modules[__name__], force)
    return result.metrics, result.manifest


def score_test(loaded: adapters.Loaded, test: Dataset, config: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test metrics of a loaded adapter, and each message's: right or not, and its log loss."""
    encoded = tokenize(test, loaded.tokenizer, config.max_length)
    logits = predict_logits(loaded.model, loaded.tokenizer, encoded, config.eval_batch_size, "scoring test")
    labels = np.array(encoded["label"])
    log_p = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()[np.arange(len(labels)), labels]
    scores = {"correct": logits.argmax(-1) == labels, "log_loss": -log_p}
    return classification_metrics(labels, logits, test.features["label"].names), scores


def check_texts(manifest: Manifest, count: int) -> list[str]:
    """The first `count` texts of the adapter's test split, rebuilt from its manifest."""
    test = load_splits(manifest.run_config, manifest.fractions)[1]["test"]
    return test["text"][:count]


def summary(manifest: Manifest, folder: Path) -> list[str]:
    """A finished run for a person: the metrics of each split, how it trained, what was truncated, where it is."""
    lines = [report.metrics_table(manifest.metrics), report.trained(manifest.training)]
    truncated, limit = manifest.data["truncated"], manifest.config["max_length"]
    if any(truncated.values()):
        lines.append(f"longer than --max-length {limit} tokens, truncated to it: {truncated}")
    return [*lines, f"adapter: {folder}"]
