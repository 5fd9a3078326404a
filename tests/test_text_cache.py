"""TextEmbeddingCache: each distinct caption encoded once, reused across runs, rebuilt when
the encoder changes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from _tiny_text import make_tiny_bert, make_tiny_clip
from ldmkit.models.text import TextEncoder
from ldmkit.training import text_cache
from ldmkit.training.text_cache import TextEmbeddingCache, caption_key

CAPTIONS = ["a red circle", "a blue square", "a red circle", "", "a green cross at the top"]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def encoder(bert_path):
    return TextEncoder(str(bert_path), max_length=12)


def count_encodes(monkeypatch, encoder):
    """Record every prompt the encoder is asked to encode."""
    seen: list[str] = []
    real = encoder.encode

    def encode(prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode", encode)
    return seen


def forbid_encoding(monkeypatch, encoder):
    def encode(*args, **kwargs):
        raise AssertionError("the cache should not have encoded anything")

    monkeypatch.setattr(encoder, "encode", encode)


def test_each_distinct_caption_is_encoded_once(tmp_path, encoder, monkeypatch):
    cache = TextEmbeddingCache(tmp_path, encoder)
    seen = count_encodes(monkeypatch, encoder)
    emb = cache.get(CAPTIONS)
    assert sorted(seen) == sorted(set(CAPTIONS))
    assert (cache.misses, cache.hits) == (4, 1) and len(cache) == 4
    cache.get(CAPTIONS[:2])
    assert (cache.misses, cache.hits) == (4, 3) and len(seen) == 4
    assert emb.tokens.shape == (5, 12, 32) and emb.tokens.dtype == torch.float32
    assert torch.equal(emb.tokens[0], emb.tokens[2])


def test_cached_rows_match_the_encoder_within_float16_rounding(tmp_path, encoder):
    direct = encoder.encode(CAPTIONS)
    half = TextEmbeddingCache(tmp_path / "f16", encoder).get(CAPTIONS)
    torch.testing.assert_close(half.tokens, direct.tokens, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(half.pooled, direct.pooled, atol=2e-3, rtol=1e-3)
    assert torch.equal(half.mask, direct.mask)
    exact = TextEmbeddingCache(tmp_path / "f32", encoder, dtype="float32").get(CAPTIONS)
    torch.testing.assert_close(exact.tokens, direct.tokens, atol=1e-6, rtol=1e-5)
    assert torch.equal(exact.tokens[3:4], encoder.null().tokens)  # "" is the null prompt


def test_a_saved_cache_is_reused_by_the_next_run_without_encoding(tmp_path, bert_path,
                                                                   monkeypatch):
    first = TextEmbeddingCache(tmp_path, TextEncoder(str(bert_path), max_length=12))
    before = first.get(CAPTIONS)
    first.save()
    encoder = TextEncoder(str(bert_path), max_length=12)  # a fresh process, same model
    forbid_encoding(monkeypatch, encoder)
    second = TextEmbeddingCache(tmp_path, encoder)
    assert len(second) == 4 and second.rebuilt_reason == ""
    after = second.get(CAPTIONS)
    assert (second.misses, second.hits) == (0, 5)
    assert torch.equal(after.tokens, before.tokens) and torch.equal(after.mask, before.mask)
    assert torch.equal(after.pooled, before.pooled)


def test_as_tensors_gives_a_deduplicated_table_and_an_index(tmp_path, encoder):
    cache = TextEmbeddingCache(tmp_path, encoder)
    table, index = cache.as_tensors(CAPTIONS)
    assert len(table) == 4 and index.tolist() == [0, 1, 0, 2, 3]
    assert table.tokens.dtype == torch.float16  # storage dtype: cast per batch
    assert torch.equal(table[index].to(torch.float32).tokens, cache.get(CAPTIONS).tokens)


def test_changing_max_length_rebuilds_the_cache(tmp_path, bert_path, caplog):
    old = TextEmbeddingCache(tmp_path, TextEncoder(str(bert_path), max_length=12))
    old.get(CAPTIONS)
    old.save()
    old_shards = set(tmp_path.glob("shard-*.safetensors"))
    with caplog.at_level(logging.WARNING):
        new = TextEmbeddingCache(tmp_path, TextEncoder(str(bert_path), max_length=8))
    assert "max_length: 12 -> 8" in new.rebuilt_reason and "rebuilding" in caplog.text
    assert len(new) == 0
    emb = new.get(CAPTIONS)
    assert new.misses == 4 and emb.tokens.shape[1] == 8
    new.save()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["encoder"]["max_length"] == 8 and manifest["entries"] == 4
    assert not old_shards & set(tmp_path.glob("shard-*.safetensors"))  # stale shards gone


def test_changing_the_encoder_rebuilds_the_cache(tmp_path, encoder):
    cache = TextEmbeddingCache(tmp_path, encoder)
    cache.get(CAPTIONS)
    cache.save()
    clip = TextEncoder(str(make_tiny_clip(tmp_path / "models")), max_length=12)
    rebuilt = TextEmbeddingCache(tmp_path, clip)
    assert "class: 'BertModel' -> 'CLIPTextModel'" in rebuilt.rebuilt_reason
    assert "hash" in rebuilt.rebuilt_reason and len(rebuilt) == 0


def test_a_corrupted_shard_is_rebuilt_not_fatal(tmp_path, encoder):
    cache = TextEmbeddingCache(tmp_path, encoder)
    cache.get(CAPTIONS)
    cache.save()
    (shard,) = tmp_path.glob("shard-*.safetensors")
    shard.write_bytes(b"not a safetensors file")
    again = TextEmbeddingCache(tmp_path, encoder)
    assert "unreadable" in again.rebuilt_reason and len(again) == 0
    assert again.get(CAPTIONS[:1]).tokens.shape == (1, 12, 32)


def test_many_saves_append_shards_then_compact_into_one(tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(text_cache, "MAX_SHARDS", 2)
    cache = TextEmbeddingCache(tmp_path, encoder)
    for caption in ["a red circle", "a blue square", "a green cross"]:
        cache.get([caption])
        cache.save()
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 1  # 3 blocks > 2: compacted
    again = TextEmbeddingCache(tmp_path, encoder)
    assert len(again) == 3 and "a blue square" in again
    torch.testing.assert_close(again.get(["a green cross"]).tokens,
                               cache.get(["a green cross"]).tokens)


def test_gathering_across_blocks_keeps_caption_order(tmp_path, encoder):
    cache = TextEmbeddingCache(tmp_path, encoder)
    first = cache.get(["a red circle"])
    second = cache.get(["a blue square"])  # a second in-memory block
    both = cache.get(["a blue square", "a red circle", "a blue square"])
    assert torch.equal(both.tokens[1], first.tokens[0])
    assert torch.equal(both.tokens[0], second.tokens[0]) and torch.equal(both.tokens[2],
                                                                           second.tokens[0])


def test_caption_key_is_the_sha1_of_the_exact_text():
    # printf 'a red circle' | sha1sum
    assert caption_key("a red circle").hex() == "35a5b3aa1ed144ebc4b2c2b4226e0b12c166fc54"
    assert caption_key("a red circle") != caption_key("a red circle ")
