"""The course's LoRA classifier (llms-from-scratch, appendix E) as the benchmark's peer, on a tiny architecture."""

import sys

import pytest
from transformers import GPT2TokenizerFast

from lora_ft.bench import course

from .conftest import GPT2_TOKENIZER

pytest.importorskip("llms_from_scratch")

TINY = {"emb_dim": 64, "n_layers": 2, "n_heads": 2, "context_length": 128}
# 42 texts of 3 to 15 tokens: five batches of 8, and drop_last leaves two out of each epoch.
TEXTS = [f"message {i}:" + " call now" * (i % 7) for i in range(42)]
LABELS = [i % 2 for i in range(42)]


@pytest.fixture(scope="module")
def tokenizer() -> GPT2TokenizerFast:
    return GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)


def expected_lora_parameters(emb_dim: int, n_layers: int, rank: int) -> int:
    """rank x (in + out) per Linear: four emb->emb in attention, emb->4emb and 4emb->emb in the feed-forward
    block, and the emb->2 head, whose own weights the course freezes with the rest."""

    def lora(n_in: int, n_out: int) -> int:
        return rank * (n_in + n_out)

    block = 4 * lora(emb_dim, emb_dim) + lora(emb_dim, 4 * emb_dim) + lora(4 * emb_dim, emb_dim)
    return n_layers * block + lora(emb_dim, 2)


def test_the_course_setup_is_timed_and_trained(tokenizer):
    result = course.measure(TEXTS, LABELS, tokenizer, warmup_steps=1, timed_steps=3, architecture=TINY)
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]

    assert result["pad_to"] == max(lengths)  # SpamDataset pads to the longest training text
    assert result["steps_per_epoch"] == len(TEXTS) // 8 == 5
    assert result["steps_timed"] == 3
    assert result["padded_tokens_per_epoch"] == 5 * 8 * result["pad_to"]
    assert sum(lengths) - 2 * max(lengths) <= result["real_tokens_per_epoch"] <= sum(lengths)
    assert result["trainable_parameters"] == expected_lora_parameters(64, 2, 16) == 37_920
    assert result["seconds_per_step"] > 0
    assert result["seconds_per_epoch"] == pytest.approx(5 * result["seconds_per_step"])
    assert result["flops_per_padded_token"] > 0
    padded_flops = result["flops_per_padded_token"] * result["padded_tokens_per_epoch"]
    assert result["gflops_per_second"] == pytest.approx(padded_flops / result["seconds_per_epoch"] / 1e9)
    assert result["peak_rss_bytes"] > 0
    assert (result["lora_rank"], result["batch_size"], result["architecture"]["emb_dim"]) == (16, 8, 64)
    assert result["llms_from_scratch_version"]
    assert result["lora_b_norm"] > 0  # every B starts at zero: the optimiser stepped


def test_the_124m_count_matches_the_book():
    # Appendix E prints "Total trainable LoRA parameters: 2,666,528" for GPT-2 124M.
    assert expected_lora_parameters(768, 12, 16) == 2_666_528


def test_available_says_how_to_install(monkeypatch):
    assert course.available() is None
    monkeypatch.setitem(sys.modules, "llms_from_scratch", None)  # makes the import fail as if not installed
    assert course.available() == "llms-from-scratch is not installed: pip install --no-deps llms-from-scratch"


def test_a_text_pandas_would_drop_is_refused(tokenizer):
    with pytest.raises(ValueError, match="CSV round trip"):
        course.course_dataset(["fine", "NA"], [0, 1], tokenizer)


def test_max_length_cuts_and_pads_as_the_course_does_for_its_validation_set(tokenizer):
    dataset = course.course_dataset(TEXTS, LABELS, tokenizer, max_length=6)
    ids = [dataset[i][0].tolist() for i in range(len(TEXTS))]
    assert {len(row) for row in ids} == {6}
    short = tokenizer(TEXTS[0])["input_ids"]  # 3 tokens
    assert ids[0] == short + [course.PAD_ID] * (6 - len(short))
    assert ids[6] == tokenizer(TEXTS[6])["input_ids"][:6]
