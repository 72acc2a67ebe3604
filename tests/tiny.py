"""Tiny randomly initialised backbones built in-process (no hub), and batches of random pairs."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from gradscope.model import RewardModel, probe_causal

VOCAB = 64


def tiny_llama_config(vocab: int = VOCAB, **overrides) -> LlamaConfig:
    """The tiny Llama every test uses (as a bare backbone here, with a score head in test_trl)."""
    return LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False), **overrides})


def tiny_backbone(kind: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaModel(tiny_llama_config(vocab))
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        return BertModel(cfg, add_pooling_layer=False)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=4, n_positions=64,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2Model(cfg)
    raise ValueError(kind)


def tiny_reward_model(kind: str, dtype=torch.float64, seed: int = 0, pooling: str | None = None) -> RewardModel:
    bb = tiny_backbone(kind, seed)
    bb.config.use_cache = False
    return RewardModel(bb, probe_causal(bb), seed=seed, pooling=pooling).to(dtype).eval()


def random_pairs(B: int, T: int, seed: int = 0, identical: int | None = None, padding_side="right"):
    """(B, 2, T) ids and masks of random pairs with unequal lengths; pair ``identical`` has equal sides."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, 2, T), generator=g)
    mask = torch.zeros(B, 2, T, dtype=torch.long)
    for b in range(B):
        for s in range(2):
            n = int(torch.randint(2, T + 1, (), generator=g))
            if padding_side == "right":
                mask[b, s, :n] = 1
            else:
                mask[b, s, T - n:] = 1
    if identical is not None:
        ids[identical, 1] = ids[identical, 0]
        mask[identical, 1] = mask[identical, 0]
    return ids, mask


def to_left_padding(ids: torch.Tensor, mask: torch.Tensor):
    """Move right padding to the left, keeping each sequence's tokens."""
    ids2, mask2 = ids.clone(), mask.clone()
    T = ids.shape[-1]
    for idx in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(2)):
        b, s = idx.tolist()
        n = int(mask[b, s].sum())
        ids2[b, s] = torch.cat([ids[b, s, n:], ids[b, s, :n]])
        mask2[b, s] = torch.cat([torch.zeros(T - n, dtype=mask.dtype), mask[b, s, :n]])
    return ids2, mask2


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1"] * 10,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def save_tiny_model_dir(path, kind: str = "llama", seed: int = 0):
    """A local HF model folder (tiny backbone + tiny tokenizer) as a user would have on disk."""
    tok = tiny_tokenizer()
    bb = tiny_backbone(kind, seed, vocab=len(tok))
    if kind == "llama":  # rotary positions: room for whole demo pairs at the byte level
        bb.config.max_position_embeddings = 512
    bb.save_pretrained(path)
    tok.save_pretrained(path)
    return path
