"""Tiny, randomly initialised text encoders with real tokenizers whose vocabulary files the
tests write themselves, saved with save_pretrained so ldmkit loads them like any model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "an", "the", "red", "blue", "green", "yellow", "purple", "orange", "circle",
         "square", "triangle", "cross", "at", "top", "bottom", "left", "right", "of", "small",
         "big", "and", "on"]


def make_tiny_bert(root: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab_dir, out = root / "bert-vocab", root / "bert"
    vocab_dir.mkdir(parents=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (vocab_dir / "vocab.txt").write_text("\n".join(specials + WORDS + ["##s"]) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(vocab_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(specials) + len(WORDS) + 1, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=40)
    BertModel(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE over lowercase letters, with merges that rebuild each of WORDS, so
    most words are one token and any other word still splits into letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters])}
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:  # left fold: c+i, ci+r, cir+c, ...
            if f"{prefix} {piece}" not in merges:
                merges.append(f"{prefix} {piece}")
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    # Specials last, as in OpenAI's vocabulary, so EOS has the largest id.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def make_tiny_clip(root: Path, seed: int = 0, full_clip: bool = False) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir, out = root / "clip-vocab", root / ("clip-full" if full_clip else "clip")
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab()
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_dir))
    torch.manual_seed(seed)
    eos = vocab["<|endoftext|>"]
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": eos, "pad_token_id": eos}
    if full_clip:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = CLIPTextModel(CLIPTextConfig(**text))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def make_tiny_t5(root: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out = root / "t5"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=2, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
