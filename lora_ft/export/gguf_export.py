"""GGUF export for llama.cpp, Ollama and LM Studio: a merged causal LM written with the `gguf` package's writer,
under the names its tensor map gives llama.cpp's architectures, with the tokenizer inside; then read back by
transformers (which loads GGUF for `gpt2` and `llama`) and checked before it is kept. Also the Ollama Modelfile.

Only what llama.cpp's own converter (convert_hf_to_gguf.py) does differently from a plain copy is written here:
GPT-2's Conv1D weights are stored transposed (llama.cpp wants [out, in]), and Llama's q/k projections are
permuted to the rotary layout llama.cpp uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from .. import data
from ..core.errors import UserError
from ..engine import gguf_reading

QTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Largest logit difference allowed between the GGUF (as transformers reads it back) and base + adapter, relative
# to the largest logit of base + adapter on the check inputs: float32 is a copy; the narrower types round each
# weight (f16 to 11 significant bits, bf16 to 8, q8_0 to 8 bits per block of 32 with a shared scale).
TOLERANCE = {"f32": 1e-5, "f16": 0.01, "bf16": 0.05, "q8_0": 0.05}


@dataclass(frozen=True)
class Family:
    """What differs between the architectures lora_ft exports: llama.cpp's name for it, its hyperparameters as
    GGUF keys, and the change (if any) a tensor needs on the way."""

    arch: gguf.MODEL_ARCH
    hparams: Callable[[Any, gguf.GGUFWriter], None]
    tensor: Callable[[str, np.ndarray, Any], np.ndarray]
    # what transformers must be told when it reads the file back: (5.x) it reads a GPT-2 GGUF's context length
    # into `n_ctx` only, leaving `n_positions` at 1024, so a model with another length would not load
    read_back: Callable[[Any], dict[str, Any]] = lambda config: {}
    # a LoRA pair's B ([out, r], as PEFT stores it for Linear and Conv1D alike) in llama.cpp's layout: only a
    # reordering of the weight's rows applies to it, never GPT-2's transpose (llama.cpp's own LoRA converter
    # transposes GPT-2's pairs, which llama.cpp then refuses)
    lora_b: Callable[[str, np.ndarray, Any], np.ndarray] = lambda name, tensor, config: tensor


def _gpt2_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _gpt2_tensor(name: str, tensor: np.ndarray, config: Any) -> np.ndarray:
    conv1d = name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    return tensor.T if conv1d else tensor  # Conv1D holds [in, out]


def _llama_hparams(config: Any, writer: gguf.GGUFWriter) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported by lora_ft's writer")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _permute(tensor: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows (each head's two rotary halves apart) in llama.cpp's order (the halves interleaved)."""
    return (
        tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)
    )


def _llama_tensor(name: str, tensor: np.ndarray, config: Any) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return _permute(tensor, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return _permute(tensor, config.num_key_value_heads)
    return tensor


FAMILIES = {
    "gpt2": Family(
        gguf.MODEL_ARCH.GPT2, _gpt2_hparams, _gpt2_tensor, lambda config: {"n_positions": config.n_positions}
    ),
    "llama": Family(gguf.MODEL_ARCH.LLAMA, _llama_hparams, _llama_tensor, lora_b=_llama_tensor),
}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UserError(f"GGUF export: model type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def pre_tokenizer(tokenizer: PreTrainedTokenizerBase, base_gguf: Path | None) -> str:
    """llama.cpp's name for how the text is split before BPE: carried over from a GGUF base (SmolLM2: 'smollm'),
    or 'gpt-2' for GPT-2's byte-level split. llama.cpp applies it by name, so a guess would tokenize wrongly."""
    if base_gguf is not None:
        field = gguf.GGUFReader(base_gguf).get_field(gguf.Keys.Tokenizer.PRE)
        if field is not None:
            return str(field.contents())
    pre = tokenizer.backend_tokenizer.pre_tokenizer.__getstate__() if tokenizer.is_fast else b""
    if b'"ByteLevel"' in pre and b'"use_regex":true' in pre and b'"add_prefix_space":false' in pre:
        return "gpt-2"
    raise UserError(
        "GGUF export: llama.cpp must be told this tokenizer's pre-tokenizer by name; lora_ft knows GPT-2's and "
        "carries over a GGUF base's"
    )


def _vocabulary(tokenizer: PreTrainedTokenizerBase, size: int) -> tuple[list[str], list[int]]:
    """Every token by id, with llama.cpp's type: added special tokens are control tokens, ids the tokenizer does
    not use (an embedding larger than the vocabulary) unused placeholders."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _encoded(tensor: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor in the export's type. As llama.cpp does: vectors (norms, biases) stay float32, and a matrix whose
    rows do not split into q8_0's blocks of 32 is written float16."""
    if tensor.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return tensor.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.astype(np.float16), qtype
    return gguf.quants.quantize(tensor.astype(np.float32), qtype), qtype


def write(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_folder: Path,
    path: Path,
    kind: str,
    name: str,
    base_gguf: Path | None,
) -> dict[str, Any]:
    """Write `model` (float32 weights) with `tokenizer` (saved in `tokenizer_folder`, where gguf's SpecialVocab
    reads its merges and special tokens) to the GGUF file `path`, in `kind` (see QTYPES); returns what the manifest
    records of it."""
    config, fam = model.config, family(model.config.model_type)
    qtype, file_type = QTYPES[kind]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[fam.arch])
    writer.add_name(name)
    fam.hparams(config, writer)
    writer.add_file_type(file_type)
    if kind == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE, GPT-2's and SmolLM2's alike
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, base_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(fam.arch, config.num_hidden_layers)
    written: dict[str, int] = {}
    for hf_name, weight in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses the token embedding as the output layer when there is no `output`
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        array, stored = _encoded(fam.tensor(hf_name, weight.float().numpy(), config), qtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", array, raw_dtype=stored)
        written[stored.name] = written.get(stored.name, 0) + 1
    _finish(writer)
    return {"file": path.name, "type": kind, "tensors_by_type": written, "bytes": path.stat().st_size}


def _finish(writer: gguf.GGUFWriter) -> None:
    """The file written in gguf's order: header, metadata, tensors."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_adapter(model: Any, path: Path, kind: str, name: str) -> dict[str, Any]:
    """The LoRA adapter of PEFT `model` (unmerged, float32) alone, as a GGUF LoRA for llama.cpp's `--lora` (one base
    file serving several adapters). llama.cpp applies W + alpha / r * B A to each weight in its own layout, and
    checks that A is [r, in] and B [out, r] in it: PEFT's pair, as PEFT stores it (also for GPT-2's Conv1D), with
    B's rows permuted as the weight's are (Llama's q/k). Each pair is checked against PEFT's own delta weight in
    llama.cpp's layout before the file is kept; returns what the manifest records."""
    config, fam = model.config, family(model.config.model_type)
    lora = model.peft_config["default"]
    if lora.use_rslora or getattr(lora, "use_dora", False) or model.modules_to_save:
        raise UserError("GGUF adapter: llama.cpp applies plain LoRA (alpha / r, no DoRA, no other trained modules)")
    qtype = QTYPES[kind][0]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[fam.arch])
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.lora_alpha))
    names = gguf.get_tensor_name_map(fam.arch, config.num_hidden_layers)
    worst = 0.0
    for module_name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        weight_name = f"{module_name}.weight"
        a = module.lora_A["default"].weight.detach().float().numpy()
        b = fam.lora_b(weight_name, module.lora_B["default"].weight.detach().float().numpy(), config)
        # PEFT's delta in the weight's own layout, moved to llama.cpp's (a transpose or a row permutation: linear)
        target = fam.tensor(weight_name, module.get_delta_weight("default").detach().float().numpy(), config)
        if a.shape[1] != target.shape[1] or b.shape[0] != target.shape[0]:
            raise UserError(f"GGUF adapter: {weight_name}'s pair does not fit its weight in llama.cpp's layout")
        applied = lora.lora_alpha / a.shape[0] * (b @ a)
        worst = max(worst, float(np.abs(applied - target).max() / max(np.abs(target).max(), 1e-12)))
        gguf_name = names.get_name(module_name)
        for suffix, tensor in (("lora_a", a), ("lora_b", b)):
            array, stored = _encoded(tensor, qtype)
            writer.add_tensor(f"{gguf_name}.weight.{suffix}", array, raw_dtype=stored)
    if worst > 1e-5:
        raise UserError(f"GGUF adapter: applied as llama.cpp does, it differs from PEFT's by {worst:.2g}")
    _finish(writer)
    return {"file": path.name, "type": kind, "alpha": lora.lora_alpha, "rank": lora.r, "max_relative_diff": worst}


def check(
    path: Path,
    batch: BatchEncoding,
    reference: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    read_back: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read the GGUF back with transformers and compare: its tokenizer must give the same ids for the check texts,
    and its logits (at real positions) must be within TOLERANCE[kind] of `reference` (base + adapter, float64),
    relative to the largest reference logit. Raises UserError otherwise. `read_back`: what transformers must be
    told to load it (the family's `read_back`)."""
    folder, file = path.parent, path.name
    with gguf_reading.each_file_parsed_once():
        read_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        mask = batch["attention_mask"].bool()
        for row, ids in enumerate(batch["input_ids"]):
            text = tokenizer.decode(ids[mask[row]])
            if read_tokenizer(text, add_special_tokens=False)["input_ids"] != ids[mask[row]].tolist():
                raise UserError(f"{file}: its tokenizer splits check text {row + 1} differently; nothing was written")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **(read_back or {}))
    with torch.no_grad():
        logits = model.eval()(**batch).logits.double()[mask]
    difference = float((logits - reference).abs().max())
    relative = difference / float(reference.abs().max())
    agree = float((logits.argmax(-1) == reference.argmax(-1)).double().mean())
    if not math.isfinite(relative) or relative > TOLERANCE[kind]:
        raise UserError(
            f"{file}: read back, its logits differ from base + adapter by up to {difference:.3g} ({relative:.2%} of "
            f"the largest logit; tolerance {TOLERANCE[kind]:.2%} for {kind}); nothing was written"
        )
    return {
        "read_back_by": "transformers (gguf_file=)",
        "tokenizer_ids_equal": True,
        "max_abs_logit_diff": difference,
        "max_abs_logit_diff_relative": relative,
        "tolerance_relative": TOLERANCE[kind],
        "same_next_token_share": agree,
    }


# lora_ft's default chat template (chat.DEFAULT_TEMPLATE, for tokenizers without one) in Ollama's Go template
# language; EOS ends each assistant turn
OLLAMA_DEFAULT_CHAT = (
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}"
    '{{ if eq .Role "assistant" }}EOS{{ else }}\n{{ end }}{{ end }}<|assistant|>\n'
)


def modelfile(gguf_name: str, prompt_template: str | None, stop: str, chat_source: str | None = None) -> str:
    """An Ollama Modelfile for the export: the prompt the adapter was trained with (around Ollama's `.Prompt`, or
    for a chat adapter its conversation template), its stop token, and greedy decoding (as lora_ft's `generate`).
    A chat adapter trained with its tokenizer's own template gets no TEMPLATE line: Ollama then takes the template
    the GGUF holds (`tokenizer.chat_template`), which no rewriting by lora_ft could match as surely."""
    if prompt_template == "chat":
        template = OLLAMA_DEFAULT_CHAT.replace("EOS", stop) if chat_source == "lora_ft default" else None
    else:
        template = data.format_prompt("{{ .Prompt }}") if prompt_template == "alpaca" else "{{ .Prompt }}"
    lines = [f"FROM ./{gguf_name}", *([f'TEMPLATE """{template}"""'] if template else [])]
    return "\n".join([*lines, f"PARAMETER stop {_quoted(stop)}", "PARAMETER temperature 0"]) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
