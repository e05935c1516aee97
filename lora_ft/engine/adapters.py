"""The adapter folder: PEFT's adapter and the tokenizer saved apart from the base, the manifest (lora_ft.json) written
and read, the adapter loaded back onto its base (checked to be the one it was trained on), and the listing."""

from __future__ import annotations

import contextlib
import hashlib
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..core import interop, registry
from ..core.errors import UserError
from ..core.files import MANIFEST_NAME
from ..core.manifest import Manifest
from ..core.report import Listed
from . import adapter_config, methods
from .runs import ADAPTERS_DIR, PARTIAL, RUN_RECORD, newest_checkpoint, output_of, read_run_record, running
from .runs import find_run as find_run  # the Python API's name for it, from before runs.py

_PACKAGES = ("lora_ft", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


def default_output(task: str, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return ADAPTERS_DIR / f"{task}-{model_name}-{stamp}"


def save_adapter(model: Any, tokenizer: Any, folder: Path, state: dict[str, Any] | None = None, **how: Any) -> None:
    """PEFT's adapter files and the tokenizer; the base is not written (a fully fine-tuned model, not a PEFT one, is
    written whole). `state`: the whole model's weights, where the model's own are sharded (PEFT picks the adapter's
    out of it); `how`: more of `save_pretrained`'s arguments (methods.save_kwargs)."""
    model.save_pretrained(folder, state_dict=state, **how)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; lora_ft.json says more
    interop.save_tokenizer(tokenizer, folder)


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def write_manifest(folder: Path, manifest: Manifest) -> None:
    manifest.write(folder)


def read_manifest(folder: str | Path, adapter: bool = True) -> Manifest:
    """The folder's manifest. With `adapter`, the folder must also hold PEFT's adapter (not a merged export)."""
    manifest = Manifest.read(folder)
    if adapter and is_whole_model(manifest):
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"{folder}: config.json is missing (a fully fine-tuned model is saved whole)")
    elif adapter and not (Path(folder) / adapter_config.FILENAME).is_file():
        if manifest.merge is not None:
            raise UserError(f"{folder}: a merged export, not an adapter (load it with transformers directly)")
        raise UserError(f"{folder}: {adapter_config.FILENAME} is missing")
    return manifest


def is_whole_model(manifest: Manifest) -> bool:
    """A fully fine-tuned model (`method` full), saved whole rather than as an adapter apart from its base."""
    return manifest.merge is None and not methods.of(manifest.config).adapter


@dataclass
class Loaded:
    """An adapter on its base, in eval mode; `base` describes the base actually loaded, and `base_mismatches`
    how it differs from the one the adapter was trained on (empty unless `force` accepted a different base)."""

    model: Any
    tokenizer: Any
    manifest: Manifest
    base: dict[str, Any]
    base_mismatches: list[str]


@dataclass
class TrainResult:
    """What a task's `train` returns: the adapter folder, its manifest, the trained model (a PeftModel)."""

    adapter_dir: Path
    manifest: Manifest
    model: Any


def loader(task: str, load_base: Callable[..., Any]) -> Callable[..., Loaded]:
    """A task's `load` (task_api.TaskModule.load): its adapters on the bases `load_base` builds (`load_with_base`)."""

    def load(
        adapter: str | Path,
        base: Any = None,
        force: bool = False,
        full_precision: bool = False,
        onto: Loaded | None = None,
        name: str = "default",
    ) -> Loaded:
        """Base (as the manifest names it, or `base`, a models.ModelSource) + adapter, in eval mode, with the
        adapter's tokenizer. A QLoRA adapter goes on its base quantised as in training, or in float32 with
        `full_precision`. With `onto`, added to that loaded adapter's model (and base) as PEFT adapter `name` (see
        `load_with_base`)."""
        return load_with_base(adapter, task, load_base, base, force, full_precision, onto, name)

    return load


def load_with_base(
    adapter: str | Path,
    task: str,
    load_base: Callable[..., Any],
    source: Any = None,
    force: bool = False,
    full_precision: bool = False,
    onto: Loaded | None = None,
    name: str = "default",
) -> Loaded:
    """The adapter on a base built by `load_base(source, tokenizer, manifest, quantize, precision)`: the base the
    manifest names, or `source`, quantised as in training (QLoRA), or in float32 with `full_precision`. A base that
    is not the one the adapter was trained on (architecture, size, weights) is refused unless `force`.
    With `onto` (an adapter already loaded on the base this one names), no base is loaded: the adapter is checked
    against `onto`'s base and added to its model as PEFT adapter `name`, sharing that base (`serve`)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .hardware import base_is_bf16, skip_input_casts
    from .models import ModelSource, base_mismatches, describe_base, source_from_manifest

    manifest = read_manifest(adapter)
    if manifest.task not in registry.TASKS or not registry.same_kind(manifest.task, task):
        raise UserError(f"{adapter}: a '{manifest.task}' adapter, not a {task} one")
    if not is_whole_model(manifest):
        adapter_config.check(adapter, manifest)
        check_weights(adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    check_template(adapter, tokenizer, manifest)
    if is_whole_model(manifest):  # its own weights: nothing to check them against, nothing to share
        own = ModelSource(str(adapter), "local", str(Path(adapter).resolve()))
        whole = load_base(own, tokenizer, manifest, None, "fp32")
        return Loaded(whole.eval(), tokenizer, manifest, manifest.base, [])
    source = source or source_from_manifest(manifest.base)
    if onto is None:
        # as trained: a bf16 adapter on a bf16 base (emulated where bf16 is not native: slower, the same numbers)
        quantize, precision = (None, "fp32") if full_precision else manifest.as_trained
        base = load_base(source, tokenizer, manifest, quantize, precision)
        info = describe_base(source, base)
    else:
        info = onto.base
    mismatches = base_mismatches(manifest.base, info)
    if mismatches and not force:
        raise UserError(
            f"{adapter}: {source.spec} is not the base it was trained on ({'; '.join(mismatches)}); "
            "pass `force` to use it anyway"
        )
    with peft_loading(adapter, source.spec):
        if onto is None:
            model = PeftModel.from_pretrained(base, adapter, adapter_name=name).eval()
        else:
            model = onto.model
            model.load_adapter(adapter, adapter_name=name)
    if base_is_bf16(model):
        skip_input_casts(model)
    return Loaded(model, tokenizer, manifest, info, mismatches)


def check_weights(adapter: str | Path) -> Path:
    """The adapter's weights file, there and safetensors (PEFT would fall back to a pickled adapter_model.bin, which
    lora_ft never loads). Callers check it before they load a base, so that a missing file is told at once."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = " (its adapter_model.bin is pickled: lora_ft loads safetensors only)"
        raise UserError(f"{weights}: missing{pickled if (Path(adapter) / 'adapter_model.bin').exists() else ''}")
    return weights


@contextlib.contextmanager
def peft_loading(adapter: str | Path, spec: str) -> Iterator[None]:
    """PEFT loading `adapter` onto the base `spec` names, inside: what goes wrong there is one line naming the file."""
    from safetensors import SafetensorError

    weights = check_weights(adapter)
    try:
        yield
    except SafetensorError as e:
        raise UserError(f"{weights}: corrupt or incomplete ({str(e).splitlines()[0]})") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # what adapter_config.check leaves to PEFT
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{Path(adapter) / adapter_config.FILENAME}: PEFT cannot load it ({why})") from None
    except RuntimeError as e:  # tensor shapes that do not fit, once --force let a different base through
        lines = [line.strip() for line in str(e).splitlines()]
        why = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise UserError(f"{adapter}: its weights do not fit {spec} ({why})") from None


def check_template(folder: str | Path, tokenizer: Any, manifest: Manifest) -> None:
    """The chat template `tokenizer` (loaded from `folder`) carries is the one the manifest records, byte for byte: a
    template is code that decides every prompt, and one changed since training would answer (and be exported, merged
    or to GGUF) in a format the adapter never learned."""
    recorded = (manifest.data or {}).get("chat_template")
    if not isinstance(recorded, dict):  # trained on instructions: its prompts are lora_ft's Alpaca format
        return
    template = tokenizer.chat_template
    found = hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) else None
    if found != recorded.get("sha256"):
        where = Path(folder) / ("chat_template.jinja" if (Path(folder) / "chat_template.jinja").is_file() else "")
        shown = f"sha256 {found[:12]}…" if found else "none"
        raise UserError(
            f"{where}: the chat template is not the one it was trained with ({shown}, the manifest records "
            f"sha256 {str(recorded.get('sha256'))[:12]}…): restore it"
        )


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def base_name(base: dict[str, Any]) -> str:
    """A short name for a manifest's base: the Hub id or alias, or the folder's name."""
    if not isinstance(base, dict):
        raise TypeError(f"'base' is {type(base).__name__}, not an object")
    if base.get("kind") == "local":
        return Path(_text(base.get("location"), "base location")).name
    return _text(base.get("spec"), "base spec")


def _text(value: Any, what: str, optional: bool = False) -> str | None:
    """A string the listing shows, from a manifest or run record; another type is a TypeError, which lists the file as
    unexpected content (the table and its sort by `created` need strings)."""
    if not isinstance(value, str) and not (optional and value is None):
        raise TypeError(f"{what} is {'null' if value is None else type(value).__name__}, not a string")
    return value


def describe_folder(folder: Path) -> Listed:
    """The listing row of an adapter or merged-export folder (for an export: when and onto what it was merged)."""
    listed = Listed(str(folder), "adapter" if (folder / adapter_config.FILENAME).is_file() else "?")
    listed.size_bytes = folder_size(folder)
    try:
        manifest = read_manifest(folder, adapter=False)
        merge = manifest.merge
        if merge and listed.kind == "?":
            listed.kind = "merged"
        elif is_whole_model(manifest) and (folder / "config.json").is_file():
            listed.kind = "full model"
        listed.method = _text(manifest.config.get("method", "lora"), "method")
        task = manifest.task
        listed.task, listed.metric = task, registry.TASKS[task].key_metric if task in registry.TASKS else None
        listed.created = _text(merge.get("created") if merge else manifest.created, "created", optional=True)
        listed.base = base_name(merge["base"] if merge else manifest.base)
        listed.value = manifest.test_metric(listed.metric)
        listed.interval = manifest.test_interval(listed.metric)
    except UserError as e:
        listed.problem = str(e)
    except (KeyError, TypeError, AttributeError) as e:
        listed.problem = f"{folder / MANIFEST_NAME}: unexpected content ({type(e).__name__}: {e})"
    return listed


def list_adapters(root: str | Path = ADAPTERS_DIR) -> list[Listed]:
    """Every adapter or merged-export folder under `root` (any depth), oldest first. Hidden folders (temp
    folders of writes in progress) are skipped; a folder whose manifest cannot be read is listed with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found")
    folders = {p.parent for name in (MANIFEST_NAME, adapter_config.FILENAME) for p in root.rglob(name)}
    visible = [f for f in folders if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    found = [describe_folder(f) for f in visible] + [
        _describe_run(p.parent) for p in root.rglob(f"*{PARTIAL}/{RUN_RECORD}")
    ]
    return sorted(found, key=lambda listed: (listed.created or "", listed.path))


def _describe_run(folder: Path) -> Listed:
    """The listing row of a training run, live ("running") or not ("interrupted"), under the output path it is
    building."""
    listed = Listed(str(output_of(folder)), "interrupted", size_bytes=folder_size(folder))
    owner, checkpoint = running(folder), newest_checkpoint(folder)
    if owner is not None:
        listed.kind, listed.state = "running", owner
    elif checkpoint is not None:
        listed.state = f"step {checkpoint.name.removeprefix('checkpoint-')}"
    try:
        record = read_run_record(folder)
        listed.task, listed.base = _text(record.get("task"), "task"), base_name(record.get("base"))
        listed.created = _text(record.get("started"), "started", optional=True)
    except UserError as e:
        listed.problem = str(e)
    except (KeyError, TypeError, AttributeError) as e:
        listed.problem = f"{folder / RUN_RECORD}: unexpected content ({type(e).__name__}: {e})"
    return listed
