"""`gradscope export`: a gradscope reward model as the architecture's ``*ForSequenceClassification``,
when that class computes the same reward; otherwise a refusal that says why."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import PairEncoder, collate, load_pairs, stack_chosen_rejected
from .errors import GradscopeError
from .model import load_model


def export_sequence_classification(checkpoint: str, out: str, check_pairs: int = 8, tol: float = 1e-4) -> Path:
    """Write ``out`` (HF save_pretrained) and check it on demo pairs: same rewards within ``tol``."""
    from transformers import AutoModelForSequenceClassification

    loaded = load_model(checkpoint, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    name = type(model.backbone).__name__
    if model.head_norm is not None:
        raise GradscopeError(f"export refused: {checkpoint} has a LayerNorm before its head, which "
                             "*ForSequenceClassification has no place for")
    if not model.causal:
        raise GradscopeError(f"export refused: {name} is an encoder; its *ForSequenceClassification pools the "
                             "first token ([CLS]) through a tanh pooler, not the last real token")
    if model.pooling != "last":
        raise GradscopeError(f"export refused: {checkpoint} pools by {model.pooling}; *ForSequenceClassification "
                             "reads the last token")
    pad, eos = tok.pad_token_id, tok.eos_token_id
    if pad is None:
        raise GradscopeError("export refused: the tokenizer has no pad token, so *ForSequenceClassification "
                             "cannot find the last real token of a padded batch")
    if pad == eos:
        raise GradscopeError(f"export refused: pad == eos (id {pad}); *ForSequenceClassification pools the last "
                             "token that is not pad_token_id, which skips a real trailing eos (e.g. SmolLM2's "
                             "<|im_end|>), so its rewards would differ from gradscope's")
    # BT-type losses never move the bias (∂(r_w - r_l)/∂b = 0); rounding can leave ~1e-10 of it
    bias = model.head.bias.detach()
    if float(bias.abs().max()) > 1e-6:
        raise GradscopeError(f"export refused: the head has a bias ({float(bias):.3g}), and the "
                             "score layer of *ForSequenceClassification has none")
    cfg = model.backbone.config.__class__.from_dict(model.backbone.config.to_dict())
    cfg.num_labels, cfg.pad_token_id = 1, pad
    try:
        seq = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError as e:
        raise GradscopeError(f"export refused: {name} has no *ForSequenceClassification class ({e})") from None
    getattr(seq, seq.base_model_prefix).load_state_dict(model.backbone.state_dict())
    score = seq.score if hasattr(seq, "score") else None
    if score is None or score.bias is not None:
        raise GradscopeError(f"export refused: {type(seq).__name__} has no bias-free 'score' layer")
    with torch.no_grad():
        score.weight.copy_(model.head.weight)
    seq.eval()
    # check: the same rewards on real pairs, right-padded as a user would batch them
    enc = PairEncoder(tok, max_length=256)
    encoded = [enc.encode(p) for p in load_pairs("demo", limit=check_pairs, sample="stratified")]
    ids, mask = collate(encoded, pad_id=pad)
    ids, mask = stack_chosen_rejected(ids), stack_chosen_rejected(mask)
    if (ids[mask.bool()] == pad).any():
        raise GradscopeError(f"export refused: the pad token (id {pad}) occurs as a real token in the "
                             "check pairs, so pooling on pad_token_id would be wrong")
    with torch.no_grad():
        ours = model(ids, mask).rewards
        theirs = seq(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    err = float((ours - theirs).abs().max())
    if err > tol * max(1.0, float(ours.abs().max())):
        raise GradscopeError(f"export refused: {type(seq).__name__} gives rewards {err:.2e} away from gradscope's")
    path = Path(out)
    seq.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
