"""Merge: fold an adapter into its base, check the result against base + adapter, and write a standalone model
that plain transformers loads (no lora_ft, no peft)."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase

from ..core import commands, files, interop, registry
from ..core.errors import UserError
from ..core.manifest import Manifest
from ..engine import adapters, methods, models
from ..tasks import task_code
from . import gguf_export

DTYPES = {name: getattr(torch, name) for name in commands.MERGE_DTYPES}
TOLERANCE = commands.MergeOptions.tolerance  # max abs logit difference: the float32 merge vs base + adapter
CHECK_EXAMPLES = 8
CHECK_MAX_TOKENS = 128
CHECK_FLOAT64_MAX_PARAMETERS = 1_000_000_000  # above, the float64 copy for the check would need > 8 GB


@dataclass
class MergeResult:
    output: Path
    manifest: Manifest


def check_texts(manifest: Manifest, count: int = CHECK_EXAMPLES) -> tuple[list[str], str]:
    """Inputs to compare the merged model on: the first test examples of the adapter's own split (rebuilt from its
    manifest by its task), or the task's sample texts when its data file is not there as it was. Also says which."""
    task = task_code.get(manifest.task, files.MANIFEST_NAME)
    if not manifest.data_unchanged():
        texts = task.SAMPLE_TEXTS
        return texts, f"{len(texts)} built-in texts ({manifest.data_file} is not there as it was)"
    texts = task.check_texts(manifest, count)
    return texts, f"the first {len(texts)} test examples of {manifest.data_file}"


def _logits(model: torch.nn.Module, batch: BatchEncoding, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits as float64, the model run in `dtype` (default: its own) and cast back after, which is lossless from
    a narrower dtype. For a causal LM, only at real (not padding) positions."""
    own = next(model.parameters()).dtype
    model.to(dtype or own)
    try:
        with torch.no_grad():
            logits = model(**batch).logits.double()
    finally:
        model.to(own)
    return logits[batch["attention_mask"].bool()] if logits.dim() == 3 else logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _finite(logits: torch.Tensor, adapter: Path, what: str) -> torch.Tensor:
    """The logits, if all are finite: a NaN compares as no difference at all (NaN > tolerance is False), so a model
    that gives NaN or inf would pass the check unless refused here."""
    if not torch.isfinite(logits).all():
        raise UserError(
            f"{adapter}: {what} gives non-finite logits (NaN or inf) on the check texts; nothing was written"
        )
    return logits


def merge(
    adapter: str | Path,
    output: str | Path,
    dtype: str = "float32",
    base: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    tolerance: float = TOLERANCE,
    gguf: str | None = None,
    gguf_adapter: bool = False,
) -> MergeResult:
    """Load the adapter on its base (the manifest's, or `base`), merge it in float32, check the merged logits
    against base + adapter (refusing above `tolerance`), cast to `dtype`, and write `output` atomically:
    safetensors weights, config, tokenizer, and the adapter's manifest with a `merge` section. With `gguf` (a
    type in gguf_export.QTYPES), also `<output name>.gguf` and an Ollama `Modelfile`, read back and checked; with
    `gguf_adapter`, also the adapter alone as a GGUF LoRA, `<output name>.lora.gguf` (in `gguf`'s type, or f32)."""
    adapter, output = Path(adapter), Path(output)
    manifest = adapters.read_manifest(adapter)
    task = registry.get(manifest.task, str(adapter / files.MANIFEST_NAME))
    _refuse_early(adapter, manifest, task, dtype, gguf, gguf_adapter)
    source = models.resolve_model(base) if base else models.source_from_manifest(manifest.base)
    keep = {"the adapter": adapter}
    if source.kind != "hub":
        keep["the base model"] = Path(source.location)
    files.check_output_free(output, overwrite, keep)

    texts, origin = check_texts(manifest)
    batch = _tokenize(AutoTokenizer.from_pretrained(adapter), texts, manifest.run_config.max_length)
    load = task_code.get(task.name).load
    quantized = manifest.run_config.quantize
    # What a QLoRA adapter was trained and evaluated on, to say how far the full-precision merge moves from it.
    as_trained = _logits(load(adapter, source, force).model, batch) if quantized else None
    loaded = load(adapter, source, force, full_precision=True)
    lora_gguf = _adapter_gguf(loaded.model, output.name, gguf or "f32") if gguf_adapter else None  # before merging
    merged, float32_merged, figures, reference = _merge_checked(loaded.model, batch, adapter, dtype, tolerance, gguf)
    check = {"inputs": origin, "examples": len(texts), **figures}
    if as_trained is not None:
        check[f"max_abs_logit_diff_vs_{quantized}_base"] = _max_diff(as_trained, _logits(merged, batch))

    section = _merge_section(adapter, loaded, quantized, dtype, check)
    with files.staged(output, overwrite, keep) as tmp:
        merged.save_pretrained(tmp)
        interop.save_tokenizer(loaded.tokenizer, tmp)
        interop.portable_config(tmp)
        if gguf is not None:
            exported = _export_gguf(float32_merged, loaded.tokenizer, tmp, output.name, gguf, source, batch, reference)
            section["gguf"] = exported | _modelfile(tmp, exported["file"], manifest, loaded.tokenizer)
        if lora_gguf is not None:
            section["gguf_adapter"], content = lora_gguf
            (tmp / section["gguf_adapter"]["file"]).write_bytes(content)
        exported_manifest = manifest.with_merge(section)
        adapters.write_manifest(tmp, exported_manifest)
    return MergeResult(output, exported_manifest)


def _refuse_early(
    adapter: Path, manifest: Manifest, task: registry.Task, dtype: str, gguf: str | None, gguf_adapter: bool
) -> None:
    """What cannot be merged or exported, refused before any model is loaded."""
    method = methods.of(manifest.config)
    if not method.adapter:
        raise UserError(
            f"{adapter}: a fully fine-tuned model (method full) is already whole, with no adapter to merge: "
            f"load it with transformers' {task.model_class}.from_pretrained"
        )
    if gguf_adapter and not method.gguf_adapter:
        raise UserError(f"`gguf_adapter`: llama.cpp's GGUF adapters hold plain LoRA pairs, not {method.name}")
    if dtype not in DTYPES:
        raise UserError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if gguf is not None and gguf not in gguf_export.QTYPES:
        raise UserError(f"`gguf` must be one of {', '.join(gguf_export.QTYPES)}, got {gguf!r}")
    if (gguf is not None or gguf_adapter) and not task.gguf:
        raise UserError(
            f"{adapter}: a {task.name} adapter cannot be exported as GGUF: llama.cpp runs language models only "
            "(it has no classification head)"
        )
    if gguf is not None or gguf_adapter:
        gguf_export.family(manifest.base.get("model_type", ""))  # refused now, not after the merge


def _merge_checked(
    model: torch.nn.Module, batch: BatchEncoding, adapter: Path, dtype: str, tolerance: float, gguf: str | None
) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any], torch.Tensor]:
    """The adapter merged into `model`'s base and cast to `dtype`, checked against base + adapter: the merged
    model, its float32 copy for the GGUF (when asked for), the check's figures, and the reference logits."""
    if dtype != "float32":  # base + adapter run in the export's dtype: the reference for the export's own figure
        same_dtype = _logits(copy.deepcopy(model).to(DTYPES[dtype]), batch)
    # Float32 arithmetic alone differs by up to ~1e-4 on a pretrained 135M model (batched vs one at a time, 3e-5);
    # run in float64, the comparison measures the merge, not that noise. Very large models stay in float32.
    size = sum(p.numel() for p in model.parameters())
    arithmetic = torch.float64 if size <= CHECK_FLOAT64_MAX_PARAMETERS else torch.float32
    reference = _finite(_logits(model, batch, arithmetic), adapter, "base + adapter")
    reference_float32 = _logits(model, batch)
    merged = model.merge_and_unload(safe_merge=True)
    difference = _max_diff(reference, _finite(_logits(merged, batch, arithmetic), adapter, "the merged model"))
    if difference > tolerance:
        raise UserError(
            f"{adapter}: the merged model's logits differ from base + adapter by up to {difference:.3g} "
            f"(tolerance {tolerance:g}); nothing was written"
        )
    check: dict[str, Any] = {
        "tolerance": tolerance,
        "arithmetic": str(arithmetic).removeprefix("torch."),
        "max_abs_logit_diff_float32": difference,  # what the tolerance applies to
        "max_abs_logit_diff_float32_run_in_float32": _max_diff(reference_float32, _logits(merged, batch)),
        "max_abs_logit_diff": difference,
    }
    if dtype == "float32":
        return merged, merged, check, reference
    float32_merged = copy.deepcopy(merged) if gguf else None  # the GGUF is made from float32 weights
    merged = merged.to(DTYPES[dtype])
    exported = _finite(_logits(merged, batch), adapter, f"the {dtype} export")
    check["max_abs_logit_diff"] = _max_diff(same_dtype, exported)  # against base + adapter in `dtype`
    check["max_abs_logit_diff_vs_float32"] = _max_diff(reference, exported)
    return merged, float32_merged, check, reference


def _merge_section(
    adapter: Path, loaded: adapters.Loaded, quantized: str | None, dtype: str, check: dict
) -> dict[str, Any]:
    """The manifest's `merge` section: what was merged into what, how, and the check's figures."""
    return {
        "created": files.now_iso(),
        "adapter": str(adapter.resolve()),
        "adapter_weights_sha256": files.sha256_file(adapter / "adapter_model.safetensors"),
        "base": loaded.base,
        "base_mismatches_forced": loaded.base_mismatches,
        # A QLoRA adapter (trained against a quantized base) is merged into the full-precision weights too.
        "merged_into": "the full-precision (float32) base",
        "adapter_trained_with_quantization": quantized,
        "dtype": dtype,
        "check": check,
        "versions": adapters.library_versions(),
    }


def _adapter_gguf(model: torch.nn.Module, name: str, kind: str) -> tuple[dict[str, Any], bytes]:
    """The adapter of the unmerged `model` as a GGUF LoRA (see gguf_export.write_adapter): what the manifest
    records, and the file's bytes (an adapter is megabytes; the export folder does not exist yet)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{name}.lora.gguf"
        return gguf_export.write_adapter(model, path, kind, name), path.read_bytes()


def _export_gguf(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    name: str,
    kind: str,
    source: models.ModelSource,
    batch: BatchEncoding,
    reference: torch.Tensor,
) -> dict[str, Any]:
    """`folder/<name>.gguf` from the float32 merged `model` and `tokenizer` (saved in `folder`), read back and
    checked against `reference` (base + adapter); what the manifest records of it."""
    path = folder / f"{name}.gguf"
    base_gguf = Path(source.location) / source.gguf_file if source.gguf_file else None
    written = gguf_export.write(model, tokenizer, folder, path, kind, name, base_gguf)
    read_back = gguf_export.family(model.config.model_type).read_back(model.config)
    return written | {"check": gguf_export.check(path, batch, reference, tokenizer, kind, read_back)}


def _modelfile(folder: Path, gguf_name: str, manifest: Manifest, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The Ollama Modelfile beside the GGUF: the adapter's prompt template and stop token."""
    stop = (manifest.generation or {}).get("stops_at") or tokenizer.eos_token
    template, chat = manifest.data.get("prompt_template"), manifest.data.get("chat_template") or {}
    text = gguf_export.modelfile(gguf_name, template, stop, chat.get("source"))
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return {"modelfile": "Modelfile", "prompt_template": template or "prompt as given", "stop": stop}


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> BatchEncoding:
    models.pad_with_eos(tokenizer)
    length = min(max_length, CHECK_MAX_TOKENS)
    return tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
