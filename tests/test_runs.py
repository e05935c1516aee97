"""No dead ends after a crash: a run killed before its first checkpoint starts again, a checkpoint cut short is
passed over, a run resumes from any folder, a live run is locked, a signal during evaluation stops it at once."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_ft.core import report
from lora_ft.engine import adapters, callbacks
from lora_ft.tasks import classify
from tests.test_reliability import _adapter_difference, run_main

LAUNCH = [sys.executable, "-m", "lora_ft"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows, two labels: a 28/4/8 split, 4 steps an epoch at batch 8."""
    path = tmp_path_factory.mktemp("data") / "d.tsv"
    path.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i} says {i * 7}\n" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def whole(small_data: Path, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter of a run never stopped: 3 epochs (checkpoints at steps 4, 8, 12)."""
    output = tmp_path_factory.mktemp("whole") / "adapter"
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(small_data), "--output", str(output), "--epochs", "3"]
    done = subprocess.run([*LAUNCH, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return output


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "lora_ft.json").read_text())


def _crash_after_training(monkeypatch: pytest.MonkeyPatch) -> None:

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(classify, "predict_logits", crash)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.parametrize("again", [[], ["spam", "--resume", "adapters/run"]], ids=["same command", "resume"])
def test_a_run_killed_before_its_first_checkpoint_starts_again(
    again: list[str], tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """kill -9 leaves `.run.partial` with run.json and no checkpoint: the listing says so, and both the same command
    and the `--resume` it offers start the run again."""
    argv = ["spam", "--model", str(tiny_gpt2), "--output", "adapters/run", "--max-steps", "60"]
    started = subprocess.Popen([*LAUNCH, *argv], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "adapters" / ".run.partial"
    _wait_for(partial / "run.json", started)
    started.kill()  # SIGKILL: no handler runs, nothing is cleaned up
    started.wait(timeout=60)
    assert not list(partial.glob("checkpoints/checkpoint-*")), "killed too late for this test"

    monkeypatch.chdir(tmp_path)
    lines = report.listing(adapters.list_adapters(tmp_path / "adapters"))
    assert lines[-1] == (
        f"interrupted: {tmp_path}/adapters/run stopped before its first checkpoint; start again: "
        f"python -m lora_ft spam --resume {tmp_path}/adapters/run"
    )
    code, _, err = run_main(again or argv, capsys)
    assert code == 0, err
    assert "stopped before its first checkpoint; starting again" in err
    assert _manifest(tmp_path / "adapters" / "run")["training"]["steps"] == 60
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["run"]


def test_a_checkpoint_cut_short_is_passed_over_for_the_one_before(
    small_data: Path, whole: Path, tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    output = tmp_path / "adapter"
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(small_data), "--output", str(output), "--epochs", "3"]
    with monkeypatch.context() as patch:
        _crash_after_training(patch)
        assert run_main([*argv, "--quiet"], capsys)[0] == 1
    checkpoints = tmp_path / ".adapter.partial" / "checkpoints"
    newest = checkpoints / "checkpoint-12"
    state = newest / "trainer_state.json"
    state.write_text(state.read_text()[:100])  # as if killed while Trainer wrote it, its last file
    (newest / "optimizer.pt").write_bytes(b"")
    kept = sorted(p.name for p in checkpoints.iterdir() if p != newest)
    assert kept, "the run kept no earlier checkpoint"

    listed = report.listing(adapters.list_adapters(tmp_path))
    step = int(kept[-1].removeprefix("checkpoint-"))
    resume = f"python -m lora_ft spam --resume {output}"
    assert f"interrupted: {output} can continue from step {step}; resume: {resume}" in listed
    code, _, err = run_main(["spam", "--resume", str(output)], capsys)
    assert code == 0, err
    assert "checkpoint-12: incomplete (the run stopped while saving it); removed" in err
    manifest = _manifest(output)
    assert manifest["training"]["resumed_at_steps"] == [step] and manifest["training"]["steps"] == 12
    assert _adapter_difference(output, whole) <= 1e-6
    assert manifest["metrics"] == _manifest(whole)["metrics"]


def test_a_run_resumes_from_another_folder_and_by_its_absolute_path(
    small_data: Path, whole: Path, tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Started with relative --data and --output in one folder, resumed from another by the absolute path."""
    started_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    started_in.mkdir(), elsewhere.mkdir()
    (started_in / "d.tsv").write_bytes(small_data.read_bytes())
    monkeypatch.chdir(started_in)
    argv = ["spam", "--model", str(tiny_gpt2), "--data", "d.tsv", "--output", "adapters/run", "--epochs", "3"]
    with monkeypatch.context() as patch:
        _crash_after_training(patch)
        assert run_main(argv, capsys)[0] == 1
    record = json.loads((started_in / "adapters" / ".run.partial" / "run.json").read_text())
    assert record["output"] == str(started_in / "adapters" / "run")
    assert record["config"]["data"] == str(started_in / "d.tsv")

    monkeypatch.chdir(elsewhere)
    code, _, err = run_main(["spam", "--resume", str(started_in / "adapters" / "run")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    assert _adapter_difference(started_in / "adapters" / "run", whole) <= 1e-6


def test_a_live_run_is_locked(tiny_gpt2: Path, tmp_path: Path, capsys) -> None:
    """A second run into the output of a live one, or a `--resume` of it, is told that it is running and by which
    process; the listing says so too. Once that process is gone, the run is an interrupted one again."""
    output = tmp_path / "run"
    argv = ["spam", "--model", str(tiny_gpt2), "--output", str(output), "--epochs", "20"]
    live = subprocess.Popen([*LAUNCH, *argv], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / ".run.partial" / "run.lock", live)
        for command in (argv, ["spam", "--resume", str(output)]):
            code, _, err = run_main(command, capsys)
            assert code == 2
            assert err.startswith(f"error: {output}: a run into it is in progress (PID {live.pid}, building ")
        lines = report.listing(adapters.list_adapters(tmp_path))
        assert lines[-1] == f"running: {output} (PID {live.pid})"
    finally:
        live.kill()
        live.wait(timeout=60)
    # no checkpoint yet (or one): started again (for one step: what matters is that it may start), or refused
    code, _, err = run_main([*argv, "--max-steps", "1"], capsys)
    assert code == 0 or (code == 2 and "an interrupted run into it is kept" in err), err


def test_two_runs_started_together_one_wins_the_other_is_told(tiny_gpt2: Path, tmp_path: Path) -> None:
    argv = ["spam", "--model", str(tiny_gpt2), "--output", str(tmp_path / "run"), "--max-steps", "3"]
    runs = [subprocess.Popen([*LAUNCH, *argv], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)].strip().splitlines()[-1]
    assert "in progress" in loser or "already exists" in loser or "started at the same time" in loser, loser
    assert (tmp_path / "run" / "lora_ft.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sigterm_during_an_evaluation_stops_within_a_batch(
    small_data: Path, whole: Path, tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM at the first batch of the evaluation at step 8 (of 4 batches): no further batch is evaluated, the
    checkpoint at step 4 is kept, and resuming from it ends with the uninterrupted run's adapter."""
    original = callbacks.StopOnSignal.on_prediction_step
    evaluated_after: list[int] = []

    def signalled(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 8 and self.received is None:
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.received is not None:
            evaluated_after.append(state.global_step)
        return original(self, args, state, control, **kwargs)

    output = tmp_path / "adapter"
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(small_data), "--output", str(output), "--epochs", "3"]
    with monkeypatch.context() as patch:
        patch.setattr(callbacks.StopOnSignal, "on_prediction_step", signalled)
        code, _, err = run_main([*argv, "--eval-batch-size", "1", "--quiet"], capsys)
    assert code == 128 + signal.SIGTERM, err
    assert err.splitlines()[0] == "interrupted by SIGTERM during the evaluation at step 8 (checkpoint at step 4 kept)"
    assert evaluated_after == []
    assert not (tmp_path / ".adapter.partial" / "checkpoints" / "checkpoint-8").exists()

    code, _, err = run_main(["spam", "--resume", str(output)], capsys)
    assert code == 0, err
    manifest = _manifest(output)
    assert manifest["training"]["resumed_at_steps"] == [4]
    assert _adapter_difference(output, whole) <= 1e-6
    for split, metrics in _manifest(whole)["metrics"].items():  # scored one by one here: the loss may differ by ulps
        assert manifest["metrics"][split] == metrics | {"loss": pytest.approx(metrics["loss"], rel=1e-5)}


def test_max_eval_samples_caps_the_val_evaluations(small_data: Path, tiny_gpt2: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "adapter"
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(small_data), "--output", str(output)]
    code, _, err = run_main([*argv, "--max-steps", "4", "--max-eval-samples", "3"], capsys)
    assert code == 0, err
    manifest = _manifest(output)
    assert manifest["config"]["max_eval_samples"] == 3 and manifest["data"]["val_evaluated"] == 3
    assert manifest["data"]["split_sizes"]["val"] == 4  # the split itself is unchanged
    assert manifest["metrics"]["val"]["examples"] == 3 and manifest["metrics"]["test"]["examples"] == 8


def test_an_output_where_nothing_can_be_written_is_one_line(small_data: Path, tiny_gpt2: Path, capsys) -> None:
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(small_data), "--output", "/proc/lora_ft/out"]
    code, _, err = run_main([*argv, "--max-steps", "1"], capsys)
    assert code == 2 and err == "error: /proc/lora_ft/out: cannot write there (No such file or directory)\n"


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_checkpoints(
    small_data: Path, tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from lora_ft.engine import training

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "adapter_model.safetensors"))

    monkeypatch.setattr(training.adapters, "save_adapter", full)
    output = tmp_path / "adapter"
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(small_data), "--output", str(output), "--max-steps", "4"]
    code, _, err = run_main([*argv, "--quiet"], capsys)
    assert code == 2
    assert err.splitlines() == [
        f"error: {output}: No space left on device",
        f"checkpoints kept in {tmp_path}/.adapter.partial",
        f"resume with: python -m lora_ft spam --resume {output}",
    ]
