"""What lora_ft adds to a Trainer run, as Trainer callbacks: token and time counts kept across a resume (`Tally`), a
clean stop on SIGINT/SIGTERM (`StopOnSignal`), progress a person can follow (`ShowProgress`) and a program can
read (`ProgressLog`), and a data order a resumed run repeats (`SeededLengthGroupedSampler`)."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..core import files, progress
from ..core.errors import Interrupted
from . import runs

log = logging.getLogger("lora_ft")


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
    then raises `Interrupted`. During an evaluation, stop after the batch, keeping the checkpoint before. A second
    SIGINT stops at once, without a new checkpoint. Processes of a distributed run agree at every step end (and
    evaluation batch) whether any of them got a signal, so that all stop at the same place."""

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

    def on_prediction_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # An evaluation of a large val split takes minutes: stop within a batch, not at its end. This step's
        # checkpoint (saved after its evaluation) is not written; the run resumes from the one before, which keeps
        # it exact: the resumed run repeats the steps since then and this evaluation.
        signum = self.agree(args)
        if signum is not None:
            checkpoint = runs.newest_checkpoint(Path(args.output_dir).parent)
            step = int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else None
            raise Interrupted(signum, step, checkpoint, evaluating=state.global_step)

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopping:
            control.should_training_stop = True

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # Stopped mid-epoch: no end-of-epoch evaluation, which the uninterrupted run would not make at this step.
        # Stopped on an epoch's last step, that evaluation (and its save) happens, as it would have anyway.
        if self.stopping and self._mid_epoch:
            control.should_evaluate = control.should_save = False


class PredictionProgress(TrainerCallback):
    """A bar over the batches of an evaluation or prediction run by Trainer (`desc` names it)."""

    def __init__(self, desc: str, transient: bool = False) -> None:
        self.desc, self.bar, self.transient = desc, None, transient

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **_: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.bar = progress.bar(
                total=total, desc=self.desc, unit="batch", hidden=total == 1, transient=self.transient
            )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_predict(self, *args: Any, **kwargs: Any) -> None:
        self.close()

    def on_evaluate(self, *args: Any, **kwargs: Any) -> None:
        self.close()


class ShowProgress(PredictionProgress):
    """What a person watching a run sees (see `progress`): a bar over the training steps with the running loss, one
    over each evaluation, and a line with each evaluation's figures. Only the main process shows them."""

    def __init__(self) -> None:
        super().__init__("evaluating on val", transient=True)  # the line with its figures stays instead
        self.steps: Any = None
        self.loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.steps = progress.bar(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.steps is not None:
            self.steps.update(state.global_step - self.steps.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.steps is not None and logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.steps.set_postfix_str(f"loss {self.loss:.4f}")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        self.close()
        if not state.is_world_process_zero or not metrics or "eval_loss" not in metrics:  # else not val: prefer's test
            return
        figures = [f"train loss {self.loss:.4f}"] if self.loss is not None else []
        best = (args.metric_for_best_model or "loss").removeprefix("eval_")
        for name in dict.fromkeys(("loss", best, "rewards/accuracies")):  # the last: DPOTrainer's reward accuracy
            if f"eval_{name}" in metrics:
                figures.append(f"val {name} {metrics[f'eval_{name}']:.4f}")
        epochs = f"/{args.num_train_epochs:g}" if args.max_steps <= 0 else ""
        log.info("epoch %.2f%s, step %d: %s", state.epoch or 0, epochs, state.global_step, ", ".join(figures))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None


class ProgressLog(TrainerCallback):
    """The run's progress as JSON lines in its run folder (`runs.PROGRESS_LOG`), for a program watching it (studio):
    one when training begins (a resumed run's step: later lines supersede those after it), one per logged train
    loss and per evaluation, and a step line at most every `STEP_SECONDS`, each with the step, ETA, tokens/s and
    memory. Appended and flushed line by line; a reader skips a last line cut short. Only the main process writes."""

    STEP_SECONDS = 1.0

    def __init__(self, path: Path, tally: Callable[[], Tally]) -> None:
        self.path, self.tally = path, tally
        self._begun, self._first_step, self._shown = time.monotonic(), 0, 0.0

    def _write(self, state: Any, event: str, **values: Any) -> None:
        if not state.is_world_process_zero:
            return
        tally, done = self.tally(), state.global_step - self._first_step
        elapsed = time.monotonic() - self._begun
        eta = (state.max_steps - state.global_step) * elapsed / done if done else None
        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        record = {"event": event, "step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch}
        record |= {"time": time.time(), "eta_seconds": eta, "rss_bytes": psutil.Process().memory_info().rss}
        record |= {"peak_rss_bytes": files.peak_rss_bytes(), "peak_gpu_bytes": gpu}
        record["tokens_per_second"] = tally.real / tally.seconds if tally.seconds else None
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record | values) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begun, self._first_step = time.monotonic(), state.global_step
        self._write(state, "begin")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if time.monotonic() - self._shown >= self.STEP_SECONDS:
            self._shown = time.monotonic()
            self._write(state, "step")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._write(state, "train", loss=float(logs["loss"]))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        shown = {k.removeprefix("eval_"): v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        self._write(state, "eval", metrics=shown, key=(args.metric_for_best_model or "loss").removeprefix("eval_"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(state, "end")


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
