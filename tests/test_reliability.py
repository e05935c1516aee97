"""Bad input gets one clear line and exit code 2 with nothing written; interrupted runs resume to the same adapter;
nothing saved is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_ft import cli
from lora_ft.engine import adapters
from lora_ft.tasks import classify
from tests.conftest import tree_sha256

# Each case: (id, files to write into tmp {name: text or bytes}, argv builder, fragments the message must hold).
# In argv, {tmp} is the test's folder, {model} the tiny GPT-2, {spam} / {instruct} copies of trained adapters.
TRAIN = ["--model", "{model}", "--output", "{tmp}/out"]
SPAM = ["spam", *TRAIN, "--data"]
INSTRUCT = ["instruct", *TRAIN, "--data"]
ONE_ITEM = '[{"instruction": "a", "output": "b"}]'
CASES: list[tuple[str, dict[str, str | bytes], list[str], list[str]]] = [
    # data files
    ("data-missing", {}, [*SPAM, "{tmp}/nope.tsv"], ["nope.tsv", "not found"]),
    ("data-empty", {"d.tsv": "\n"}, [*SPAM, "{tmp}/d.tsv"], ["d.tsv", "empty"]),
    ("data-binary", {"d": b"ham\thi\n\x89PNG\x00\x01"}, [*SPAM, "{tmp}/d"], ["/d:", "binary", "line 2"]),
    ("data-not-utf8", {"d": b"ham\thello\nspam\tcaf\xe9\n"}, [*SPAM, "{tmp}/d"], ["/d:", "line 2 is not UTF-8"]),
    ("data-no-tab", {"d": "ham\thello\nspam no tab\n"}, [*SPAM, "{tmp}/d"], ["/d:", "line 2 has no tab"]),
    ("data-empty-text", {"d": "ham\thello\nspam\t  \n"}, [*SPAM, "{tmp}/d"], ["/d:", "line 2 has an empty text"]),
    ("data-one-class", {"d": "ham\ta\nham\tb\n"}, [*SPAM, "{tmp}/d"], ["/d:", "two different labels", "ham"]),
    ("csv-columns", {"d.csv": "message,kind\nhi,ham\n"}, [*SPAM, "{tmp}/d.csv"], ["d.csv", "'text' and 'label'"]),
    ("jsonl-columns", {"d.jsonl": '{"text": "hi"}\n'}, [*SPAM, "{tmp}/d.jsonl"], ["d.jsonl", "line 1 has no 'label'"]),
    ("data-too-few", {"d": "ham\ta\nspam\tb\n"}, [*SPAM, "{tmp}/d"], ["/d:", "too few"]),
    ("json-parse", {"i.json": '[{"instruction": "a",\n oops}]'}, [*INSTRUCT, "{tmp}/i.json"], ["i.json", "line 2"]),
    ("json-not-list", {"i.json": '{"instruction": "a"}'}, [*INSTRUCT, "{tmp}/i.json"], ["i.json", "list of objects"]),
    ("json-no-instruction", {"i.json": '[{"output": "b"}]'}, [*INSTRUCT, "{tmp}/i.json"], ["item 1", "'instruction'"]),
    ("json-no-output", {"i.json": '[{"instruction": "a"}]'}, [*INSTRUCT, "{tmp}/i.json"], ["item 1", "'output'"]),
    (
        "json-wrong-type",
        {"i.json": '[{"instruction": "a", "output": 3}]'},
        [*INSTRUCT, "{tmp}/i.json"],
        ["i.json", "item 1", "'output' must be a string"],
    ),
    ("json-empty", {"i.json": "[]"}, [*INSTRUCT, "{tmp}/i.json"], ["i.json", "no examples"]),
    ("json-too-few", {"i.json": ONE_ITEM}, [*INSTRUCT, "{tmp}/i.json"], ["i.json", "too few"]),
    ("jsonl-line", {"i.jsonl": '{"instruction": "a", "output": "b"}\n[1]\n'}, [*INSTRUCT, "{tmp}/i.jsonl"], ["line 2"]),
    # recipes and flags
    (
        "recipe-unknown-key",
        {"r.yaml": "lerning_rate: 0.1\n"},
        ["spam", "--config", "{tmp}/r.yaml"],
        ["r.yaml", "'lerning_rate'"],
    ),
    (
        "recipe-wrong-type",
        {"r.yaml": "lr: fast\n"},
        ["spam", "--config", "{tmp}/r.yaml"],
        ["r.yaml", "'lr' must be float"],
    ),
    ("recipe-lr", {"r.yaml": "lr: 0\n"}, ["spam", "--config", "{tmp}/r.yaml"], ["r.yaml", "'lr' must be > 0"]),
    (
        "recipe-r",
        {"r.yaml": "lora_r: -4\n"},
        ["instruct", "--config", "{tmp}/r.yaml"],
        ["r.yaml", "'lora_r' must be > 0"],
    ),
    (
        "recipe-dropout",
        {"r.yaml": "lora_dropout: 1.0\n"},
        ["spam", "--config", "{tmp}/r.yaml"],
        ["r.yaml", "'lora_dropout'"],
    ),
    ("recipe-yaml", {"r.yaml": "lr: [1\n"}, ["spam", "--config", "{tmp}/r.yaml"], ["r.yaml", "not valid YAML"]),
    ("recipe-missing", {}, ["spam", "--config", "{tmp}/r.yaml"], ["r.yaml", "not found"]),
    ("flag-range", {}, ["spam", *TRAIN, "--lora-dropout", "1.5"], ["command line", "'lora_dropout'"]),
    ("flag-type", {}, ["spam", "--lr", "fast"], ["--lr", "invalid float value: 'fast'"]),
    # models
    ("model-unknown-offline", {}, ["spam", "--model", "nobody/no-such-model"], ["'nobody/no-such-model'", "offline"]),
    ("model-no-folder", {}, ["spam", "--model", "{tmp}/gone/"], ["gone", "not found"]),
    ("model-no-weights", {"m/config.json": "{}"}, ["spam", "--model", "{tmp}/m"], ["/m:", "no weight files"]),
    ("model-corrupt-weights", {}, ["spam", "--model", "{model_copy}"], ["model_copy", "cannot load the model"]),
    ("model-bad-config", {}, ["instruct", "--model", "{model_copy}"], ["model_copy/config.json", "not a valid JSON"]),
    ("adapter-no-config", {}, ["predict", "{spam}", "hello"], ["adapter_config.json is missing"]),
    ("adapter-corrupt", {}, ["predict", "{spam}", "hello"], ["adapter_model.safetensors", "corrupt"]),
    ("adapter-other-weights", {}, ["predict", "{spam}", "hello"], ["not the base", "weights sha256"]),
    ("adapter-other-size", {}, ["eval", "{spam}"], ["not the base", "hidden size 64, adapter trained on 768"]),
    ("adapter-other-arch", {}, ["generate", "{instruct}", "--instruction", "a"], ["not the base", "architecture"]),
    ("adapter-wrong-task", {}, ["generate", "{spam}", "--instruction", "a"], ["a 'spam' adapter"]),
    ("merge-not-adapter", {}, ["merge", "{tmp}", "--output", "{tmp}/out"], ["not a lora_ft adapter"]),
    ("predict-not-adapter", {}, ["predict", "{tmp}", "hi"], ["{tmp}", "no lora_ft.json"]),
    ("eval-no-folder", {}, ["eval", "{tmp}/nope"], ["nope", "adapter folder not found"]),
    ("generate-nothing", {}, ["generate", "{instruct}"], ["nothing to answer"]),
    ("generate-input-alone", {}, ["generate", "{instruct}", "--input", "x"], ["--input goes with --instruction"]),
    ("generate-top-p", {}, ["generate", "{instruct}", "--instruction", "x", "--top-p", "0"], ["--top-p in (0, 1]"]),
    (
        "generate-max-new-tokens",
        {},
        ["generate", "{instruct}", "--instruction", "x", "--max-new-tokens", "0"],
        ["--max-new-tokens must be > 0"],
    ),
    ("predict-file-missing", {}, ["predict", "{spam}", "--file", "{tmp}/t.txt"], ["t.txt", "cannot read"]),
    (
        "generate-file-bad",
        {"p.jsonl": "{oops\n"},
        ["generate", "{instruct}", "--file", "{tmp}/p.jsonl"],
        ["p.jsonl", "line 1"],
    ),
    ("inspect-missing", {}, ["inspect", "{tmp}/nothing"], ["nothing", "not found"]),
    ("adapters-missing", {}, ["adapters", "{tmp}/nothing"], ["nothing", "not found"]),
    ("bench-tokenizer", {}, ["bench", "--tokenizer", "{tmp}/no-tokenizer/"], ["no-tokenizer", "not found"]),
    ("resume-nothing", {}, ["spam", *TRAIN, "--resume", "{tmp}/out"], ["--resume", "no interrupted run"]),
    ("resume-latest", {}, ["instruct", "--output", "{tmp}/x", "--resume", "latest"], ["no interrupted instruct run"]),
    # input that once ended in "internal error" (issue 16)
    ("json-deep", {"i.json": "[" * 100_000 + "]" * 100_000}, [*INSTRUCT, "{tmp}/i.json"], ["i.json", "too deeply"]),
    ("jsonl-deep", {"d.jsonl": "[" * 100_000 + "]" * 100_000}, [*SPAM, "{tmp}/d.jsonl"], ["line 1", "too deeply"]),
    (
        "csv-huge-field",
        {"d.csv": 'text,label\nhi,ham\n"' + "x" * 140_000 + '",spam\n'},
        [*SPAM, "{tmp}/d.csv"],
        ["d.csv", "line 3 is not CSV", "field larger than field limit"],
    ),
    ("recipe-deep", {"r.yaml": "[" * 5000 + "]" * 5000}, ["spam", "--config", "{tmp}/r.yaml"], ["r.yaml", "YAML"]),
    ("seed-negative", {}, ["spam", *TRAIN, "--seed", "-5"], ["command line", "'seed' must be in [0, 2**32)"]),
    ("predict-empty-text", {}, ["predict", "{spam}", "ok", ""], ["text 2 of 2 is empty"]),
    ("max-length-positions", {}, ["spam", *TRAIN, "--max-length", "100000"], ["--max-length 100000", "256 positions"]),
    ("adapter-pickled", {}, ["predict", "{spam}", "hi"], ["adapter_model.safetensors: missing", "pickled"]),
    # adapter_config.json edited by hand (issue 30): PEFT's declared types, then the manifest's record, field by field
    ("config-alpha-string", {}, ["predict", "{spam}", "hi"], ["adapter_config.json", '"lora_alpha" is "32", not int']),
    ("config-peft-type", {}, ["predict", "{spam}", "hi"], ["adapter_config.json", '"peft_type" is "NOPE"']),
    ("config-embeddings", {}, ["eval", "{spam}"], ['"modules_to_save" is ["wte", "score"]', "trained with"]),
    ("config-dora", {}, ["predict", "{spam}", "hi"], ['"use_dora" is true, but the adapter was trained with false']),
    ("config-rank", {}, ["predict", "{spam}", "hi"], ['"r" is 8, but the adapter was trained with 16']),
    ("config-task", {}, ["generate", "{instruct}", "--instruction", "a"], ['"task_type" is "SEQ_CLS"', "CAUSAL_LM"]),
    ("config-changed", {}, ["predict", "{spam}", "hi"], ["adapter_config.json: changed since training"]),
    ("config-not-json", {}, ["predict", "{spam}", "hi"], ["adapter_config.json: unreadable"]),
    ("config-not-object", {}, ["predict", "{spam}", "hi"], ["adapter_config.json: a JSON list, not an object"]),
]


def _edit_manifest(folder: Path, edit: Callable[[dict], None], name: str = "lora_ft.json") -> None:
    path = folder / name
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _edit_config(**fields: object) -> Callable[[Path], None]:
    return lambda a: _edit_manifest(a, lambda config: config.update(fields), "adapter_config.json")


# How a case damages its copy of a trained adapter or of the tiny GPT-2 (the fixtures themselves stay intact).
DAMAGE: dict[str, Callable[[Path], None]] = {
    "adapter-no-config": lambda a: (a / "adapter_config.json").unlink(),
    "adapter-corrupt": lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{garbage"),
    "adapter-other-weights": lambda a: _edit_manifest(a, lambda m: m["base"].update(weights_sha256="0" * 64)),
    "adapter-other-size": lambda a: _edit_manifest(a, lambda m: m["base"].update(hidden_size=768)),
    "adapter-other-arch": lambda a: _edit_manifest(a, lambda m: m["base"].update(model_type="llama")),
    "adapter-pickled": lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
    "config-alpha-string": _edit_config(lora_alpha="32"),
    "config-peft-type": _edit_config(peft_type="NOPE"),
    "config-embeddings": _edit_config(modules_to_save=["wte", "score"]),
    "config-dora": _edit_config(use_dora=True),
    "config-rank": _edit_config(r=8),
    "config-task": _edit_config(task_type="SEQ_CLS"),
    "config-changed": _edit_config(layers_to_transform=[0]),  # a field the manifest does not name: its sha256 does
    "config-not-json": lambda a: (a / "adapter_config.json").write_text("{oops"),
    "config-not-object": lambda a: (a / "adapter_config.json").write_text("[]"),
    "model-corrupt-weights": lambda m: (m / "model.safetensors").write_bytes(b"not safetensors at all"),
    "model-bad-config": lambda m: (m / "config.json").write_text('{"model_type": "gpt2", "n_embd": "wide"'),
}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("name", "files", "argv", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(
    name: str,
    files: dict[str, str | bytes],
    argv: list[str],
    fragments: list[str],
    tmp_path: Path,
    tiny_gpt2: Path,
    spam_run,
    instruct_run,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {"tmp": str(tmp_path), "model": str(tiny_gpt2), "model_copy": str(tmp_path / "model_copy")}
    values |= {"spam": str(tmp_path / "spam_adapter"), "instruct": str(tmp_path / "instruct_adapter")}
    for key, original in (
        ("spam", spam_run[0].adapter_dir),
        ("instruct", instruct_run[0].adapter_dir),
        ("model_copy", tiny_gpt2),
    ):
        if f"{{{key}}}" in argv:
            shutil.copytree(original, values[key])
            if name in DAMAGE:
                DAMAGE[name](Path(values[key]))
    for relative, content in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        write = (tmp_path / relative).write_bytes if isinstance(content, bytes) else (tmp_path / relative).write_text
        write(content)  # type: ignore[arg-type]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    try:
        code = cli.main([arg.format(**values) for arg in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment.format(**values) in lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no output, no temp folder


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["spam", "--data", str(tmp_path / "nope"), "--debug"], capsys)
    assert code == 2 and "Traceback" in err and err.strip().endswith("nope: data file not found")


def _adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


EPOCHS = ["--epochs", "2"]  # 262 steps on the SMS split (131 with two processes): an interrupt lands in the second
LAUNCH = {1: [sys.executable, "-m", "lora_ft"]}
# torchrun SIGKILLs its workers 30 s after a signal unless told otherwise: on a loaded machine the workers' last step
# and checkpoint can take longer, and the test would then see them killed instead of lora_ft's clean stop
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCH[2] = [*TORCHRUN, "--shutdown-timeout", "600", "-m", "lora_ft"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The adapter an uninterrupted run writes, with 1 or 2 processes (made once each, when first asked for)."""
    made: dict[int, Path] = {}

    def adapter(processes: int) -> Path:
        if processes not in made:
            output = tmp_path_factory.mktemp("whole") / "adapter"
            command = [*LAUNCH[processes], "spam", "--model", str(tiny_gpt2), "--output", str(output), *EPOCHS]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            made[processes] = output
        return made[processes]

    return adapter


@pytest.mark.parametrize(
    ("signum", "processes", "how"),
    [
        # one process and SIGINT under -m slow: the default suite has them in prefer's resume test (the same engine),
        # the printed command in test_runs.py and test_studio.py
        pytest.param(signal.SIGINT, 1, "printed command", marks=pytest.mark.slow),
        (signal.SIGTERM, 2, "latest"),
    ],
)
def test_interrupted_run_resumes_to_the_uninterrupted_adapter(
    signum: int, processes: int, how: str, uninterrupted: Callable[[int], Path], tiny_gpt2: Path, tmp_path: Path
) -> None:
    """A real training run (one process, or two under torchrun) gets the signal, sent to its process group as
    Ctrl-C or a service manager would, once its first epoch's checkpoint is written. It saves where it is and
    exits 128 + signal; resuming ends with the adapter an uninterrupted run of the same seed wrote."""
    started = subprocess.Popen(
        [*LAUNCH[processes], "spam", "--model", str(tiny_gpt2), "--output", "adapters/run", *EPOCHS],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    checkpoints = tmp_path / "adapters" / ".run.partial" / "checkpoints"
    deadline = time.monotonic() + 300
    while started.poll() is None and time.monotonic() < deadline:
        if any(checkpoints.glob("checkpoint-*/trainer_state.json")):
            os.killpg(started.pid, signum)
            break
        time.sleep(0.05)
    _, err = started.communicate(timeout=300)

    name = signal.Signals(signum).name
    stopped = [line for line in err.splitlines() if line.startswith(f"interrupted by {name} at step ")]
    assert len(stopped) == 1, err[-3000:]  # reported once, by the main process
    assert started.returncode == (128 + signum if processes == 1 else 1)  # torchrun exits 1 when its workers fail
    step = int(stopped[0].split("at step ")[1].split(",")[0])
    steps = 262 // processes
    assert steps // 2 <= step < steps
    assert (checkpoints / f"checkpoint-{step}" / "optimizer.pt").is_file()
    assert not (tmp_path / "adapters" / "run").exists()
    printed = [line for line in err.splitlines() if line.startswith("resume with: ")]
    launcher = "python" if processes == 1 else "<torchrun or accelerate launch, as before>"
    assert printed == [f"resume with: {launcher} -m lora_ft spam --resume adapters/run"]
    listed = adapters.list_adapters(tmp_path / "adapters")
    assert [(row.path, row.kind, row.task) for row in listed] == [
        (str(tmp_path / "adapters" / "run"), "interrupted", "spam")
    ]

    resume = printed[0].split()[-2:] if how == "printed command" else ["--resume", "latest"]
    done = subprocess.run(
        [*LAUNCH[processes], "spam", *resume], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    adapter, whole = tmp_path / "adapters" / "run", uninterrupted(processes)
    assert _adapter_difference(adapter, whole) <= 1e-6
    resumed, reference = (json.loads((a / "lora_ft.json").read_text()) for a in (adapter, whole))
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["training"]["resumed_at_steps"] == [step] and reference["training"]["resumed_at_steps"] == []
    assert resumed["training"]["tokens"] == reference["training"]["tokens"]  # counted over both parts of the run
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["run"]  # checkpoints gone with the run


def test_second_run_into_an_existing_adapter_leaves_it_byte_identical(
    spam_run, instruct_run, tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for task, run in (("spam", spam_run), ("instruct", instruct_run)):
        existing = tmp_path / task
        shutil.copytree(run[0].adapter_dir, existing)
        before = tree_sha256(existing)
        code, _, err = run_main([task, "--model", str(tiny_gpt2), "--output", str(existing)], capsys)
        assert code == 2 and err == f"error: {existing}: already exists; choose another --output or pass --overwrite\n"
        assert tree_sha256(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instruct", "spam"]


def test_a_crash_keeps_the_previous_adapter_and_the_checkpoints(
    spam_run, tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    existing = tmp_path / "adapter"
    shutil.copytree(spam_run[0].adapter_dir, existing)
    before = tree_sha256(existing)
    # --quiet: stderr holds only what the crash prints (progress lines would come first otherwise)
    argv = ["spam", "--model", str(tiny_gpt2), "--output", str(existing), "--max-steps", "20", "--overwrite", "--quiet"]

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(classify, "predict_logits", crash)  # after training, before anything is written
    code, _, err = run_main(argv, capsys)
    assert code == 1 and err.startswith("internal error: RuntimeError: disk on fire")
    assert err.strip().endswith(f"resume with: python -m lora_ft spam --resume {existing} --overwrite")
    assert tree_sha256(existing) == before
    checkpoint = tmp_path / ".adapter.partial" / "checkpoints" / "checkpoint-20"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    kept = tree_sha256(checkpoint)

    # A new run into the same output does not clear the crashed run's checkpoints.
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "an interrupted run into it is kept in" in err and "--resume" in err
    assert tree_sha256(checkpoint) == kept and tree_sha256(existing) == before

    monkeypatch.undo()
    code, _, err = run_main(["spam", "--resume", str(existing), "--overwrite"], capsys)
    assert code == 0, err
    manifest = json.loads((existing / "lora_ft.json").read_text())
    assert manifest["training"]["resumed_at_steps"] == [20] and manifest["training"]["steps"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    whole = tmp_path / "whole"  # the same run, never crashed
    assert run_main([*argv[:4], str(whole), *argv[5:]], capsys)[0] == 0
    assert _adapter_difference(existing, whole) <= 1e-6
    assert manifest["metrics"] == json.loads((whole / "lora_ft.json").read_text())["metrics"]


def test_resume_refuses_a_changed_run(tmp_path: Path, tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Flags that differ from the interrupted run's, or its data changed since, are refused: the result would not be
    the run that was started."""
    data = tmp_path / "d.tsv"
    data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i}\n" for i in range(40)))
    output = tmp_path / "adapter"
    argv = ["spam", "--model", str(tiny_gpt2), "--data", str(data), "--output", str(output), "--max-steps", "2"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classify, "predict_logits", lambda *a, **k: 1 / 0)
        assert run_main(argv, capsys)[0] == 1
    code, _, err = run_main(["spam", "--resume", str(output), "--lr", "0.1"], capsys)
    assert code == 2 and "--lr 0.1 (was 0.0005)" in err
    data.write_text(data.read_text() + "ham\tone more\n")
    code, _, err = run_main(["spam", "--resume", str(output)], capsys)
    assert code == 2 and f"data {data} (its sha256 differs" in err
    assert not output.exists() and (tmp_path / ".adapter.partial" / "checkpoints" / "checkpoint-2").is_dir()


def test_longer_than_max_length_is_truncated_and_counted(
    tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """spam keeps a message's first --max-length tokens (instruct leaves long examples out: test_instruct); both say
    how many, in the manifest and the output, and `predict` says which."""
    data = tmp_path / "d.tsv"
    texts = [("long words " * 10 if i % 4 < 2 else "short") + f" {i}" for i in range(40)]
    data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{t}\n" for i, t in enumerate(texts)))
    output = tmp_path / "adapter"
    argv = ["--model", str(tiny_gpt2), "--data", str(data), "--output", str(output), "--max-length", "8"]
    code, out, _ = run_main(["spam", *argv, "--max-steps", "2"], capsys)
    assert code == 0
    truncated = json.loads((output / "lora_ft.json").read_text())["data"]["truncated"]
    assert sum(truncated.values()) == 20  # the 20 long messages, whichever split each fell in
    assert f"longer than --max-length 8 tokens, truncated to it: {truncated}" in out

    code, out, err = run_main(["predict", str(output), "short one", "long words " * 10, "--json"], capsys)
    assert code == 0 and [json.loads(line)["truncated"] for line in out.splitlines()] == [False, True]
    assert "note: 1 of 2 texts are longer than the adapter's max_length tokens" in err


def test_a_file_too_large_to_read_whole_is_refused_unread(tiny_gpt2: Path, tmp_path: Path, capsys) -> None:
    big = tmp_path / "big.tsv"
    with open(big, "wb") as f:  # sparse: 2 GiB on paper, a few bytes on disk
        f.write(b"ham\thello\n")
        f.truncate(2 << 30)
    code, _, err = run_main(["spam", *TRAIN, "--data", str(big)], capsys)
    assert code == 2 and err.startswith(f"error: {big}: 2.0 GB, more than the 1 GB a data file may be")
    assert err.count("\n") == 1


def test_the_listing_shows_a_broken_manifest_and_goes_on(spam_run, tmp_path: Path, capsys) -> None:
    shutil.copytree(spam_run[0].adapter_dir, tmp_path / "good")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "lora_ft.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, _ = run_main(["adapters", str(tmp_path)], capsys)
    assert code == 0
    assert f"unreadable: {tmp_path / 'deep' / 'lora_ft.json'}: not valid JSON" in out and "too deeply" in out
    assert any(line.startswith(str(tmp_path / "good")) and "accuracy" in line for line in out.splitlines())
