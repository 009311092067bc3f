"""Tiny language models built in-process for tests: random weights, a real fast tokenizer, no download.

make_tiny_llama(folder) and make_tiny_bert(folder) write a Hugging Face model folder (config.json,
model.safetensors, tokenizer.json, ...) that `saekit.lm.models.load_model(str(folder))` loads.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _training_text() -> list[str]:
    """A few stdlib docstrings: enough English and code words for a small BPE vocabulary."""
    import collections
    import json
    import os
    import pathlib
    import textwrap

    texts = []
    for mod in (collections, json, os, pathlib, textwrap):
        texts.append(mod.__doc__ or "")
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def make_tokenizer(vocab: int, specials: list[str]):
    """A byte-level BPE tokenizer (any text encodes, no unknowns) trained on stdlib docstrings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok


def make_tiny_llama(
    folder: Path,
    *,
    vocab: int = 512,
    layers: int = 4,
    hidden: int = 32,
    intermediate: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised (seeded) LlamaForCausalLM and its byte-level BPE tokenizer into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(vocab, [EOS]), eos_token=EOS, bos_token=EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_bert(
    folder: Path, *, vocab: int = 512, layers: int = 2, hidden: int = 32, intermediate: int = 64, heads: int = 4, seed: int = 0
) -> Path:
    """Save a randomly initialised (seeded) BertModel and a byte-level BPE tokenizer with BERT's specials into `folder`."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=make_tokenizer(vocab, BERT_SPECIALS),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
