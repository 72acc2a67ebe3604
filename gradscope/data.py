"""Load preference pairs (local files, hub ids, the built-in demo) into validated rows, and collate them.

A pair is stored as two conversations (lists of ``{"role", "content"}`` messages) that share the
prompt and end in the chosen or the rejected response. Tokenised batches hold the pairs as
``(B, 2, T)`` tensors (index 0 chosen, 1 rejected); :func:`stack_chosen_rejected` lays them out
as ``[chosen; rejected]`` with shape ``(2B, T)``, as TRL's reward trainer does:

>>> import torch
>>> x = torch.tensor([[[1, 1], [2, 2]], [[3, 3], [4, 4]]])  # 2 pairs: chosen 1, 3; rejected 2, 4
>>> stack_chosen_rejected(x).tolist()
[[1, 1], [3, 3], [2, 2], [4, 4]]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .errors import DataError
from .packing import Collated, packed_length, packs, shared_prefix_length
from .packing import pack as pack_rows
from .rewardbench import category_for

DEMO = "demo"
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
SAMPLE_MODES = ("first", "stratified")
TRUNCATION_SIDES = ("left", "right")


@dataclass(frozen=True)
class FieldNames:
    """Which field of a row holds what (defaults: RewardBench's and TRL's names)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str = "id"
    subset: str = "subset"
    category: str = "category"
    margin: str = "margin"


@dataclass(frozen=True)
class Pair:
    pair_id: str
    chosen: tuple[dict, ...]  # full conversation ending in the chosen response
    rejected: tuple[dict, ...]  # same prompt, ending in the rejected response
    subset: str
    category: str
    margin: float | None = None
    extra: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------- loading


def load_pairs(
    source: str | Path,
    *,
    split: str = "train",
    fields: FieldNames = FieldNames(),
    limit: int | None = None,
    sample: str = "first",
) -> list[Pair]:
    """Read and validate every row of ``source``; raise :class:`DataError` naming file, row and field.

    ``source`` is ``"demo"`` (the built-in demo set), a local ``.jsonl/.json/.parquet/.csv`` file,
    or a Hugging Face hub dataset id (read with ``datasets.load_dataset(source, split=split)``).
    ``limit`` keeps N pairs: the first N (``sample="first"``) or N spread evenly over the
    subsets of every category, in file order within each (``sample="stratified"``).
    """
    if sample not in SAMPLE_MODES:
        raise DataError(str(source), f"unknown sample mode {sample!r}; known: {', '.join(SAMPLE_MODES)}")
    if limit is not None and limit < 1:
        raise DataError(str(source), f"limit must be at least 1, got {limit}")
    sources = split_sources(source)
    if len(sources) > 1:  # several sources: each read (and limited) on its own, then concatenated
        pairs = [p for s in sources for p in load_pairs(s, split=split, fields=fields, limit=limit, sample=sample)]
        _check_unique_ids(pairs, str(source))
        return pairs
    name, rows = _read_rows(source, split)
    pairs = [_to_pair(row, where, name, fields, index) for index, (where, row) in enumerate(rows)]
    if not pairs:
        raise DataError(name, "no rows")
    _check_unique_ids(pairs, name)
    if limit is not None:
        pairs = _take(pairs, limit, sample)
    return pairs


def split_sources(source: str | Path) -> list[str]:
    """``"a.jsonl,b.jsonl"`` -> both (a path that exists as written is one source, commas and all)."""
    text = str(source)
    if "," not in text or Path(text).exists():
        return [text]
    return [s.strip() for s in text.split(",") if s.strip()]


def prompt_key(pair: Pair) -> str:
    """The pair's prompt: every message before the chosen response."""
    return json.dumps(list(pair.chosen[:-1]), sort_keys=True, ensure_ascii=False)


def split_by_prompt(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, validation): a pair goes to validation when the hash of its prompt falls below
    ``fraction``, so pairs that share a prompt always land on the same side, and the split of a
    pair does not depend on which other pairs were loaded (a --limit or another file)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    train, val = [], []
    for p in pairs:
        u = int(hashlib.sha256(prompt_key(p).encode()).hexdigest()[:12], 16) / 16 ** 12  # in [0, 1)
        (val if u < fraction else train).append(p)
    return train, val


def demo_path() -> Path:
    """The built-in demo set (a demo for trying the tool, not a benchmark)."""
    return Path(str(resources.files("gradscope.resources") / "demo_pairs.jsonl"))


def _read_rows(source: str | Path, split: str) -> tuple[str, Iterator[tuple[str, Any]]]:
    if str(source) == DEMO:
        source = demo_path()
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DataError(str(path), "is a directory; give a .jsonl, .json, .parquet or .csv file")
        suffix = path.suffix.lower()
        readers = {".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".json": _json_rows,
                   ".parquet": _table_rows, ".csv": _table_rows}
        if suffix not in readers:
            raise DataError(str(path), f"unknown file type {suffix!r}; known: {', '.join(LOCAL_SUFFIXES)}")
        return str(path), readers[suffix](path)
    if path.suffix.lower() in LOCAL_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise DataError(str(source), "no such file")
    return str(source), _hub_rows(str(source), split)


def _not_utf8(path: Path, data: bytes, e: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8, naming the line of the first bad byte."""
    line = data[: e.start].count(b"\n") + 1
    return DataError(str(path), f"not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8",
                     where=f"line {line}")


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"malformed JSON ({e.msg} at column {e.colno})",
                            where=f"line {lineno}") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(str(path), 'expected a list of rows (or {"data": [...]})')
    for i, row in enumerate(obj):
        yield f"row {i}", row


def _table_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        else:
            import io

            df = pd.read_csv(io.StringIO(_read_text(path)))
    except DataError:
        raise
    except Exception as e:  # pyarrow / pandas parse errors
        raise DataError(str(path), f"cannot read table ({type(e).__name__}: {e})") from None
    for i, row in enumerate(df.to_dict(orient="records")):
        yield f"row {i}", {k: _from_table_value(v) for k, v in row.items()}


def _from_table_value(v: Any) -> Any:
    if hasattr(v, "tolist"):  # numpy arrays of messages from parquet
        v = v.tolist()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _hub_rows(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise DataError(dataset_id, "not a local file, and loading it as a hub dataset failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for i, row in enumerate(ds):
        yield f"row {i}", row


# ------------------------------------------------------------------------------------- validation


def _to_pair(row: Any, where: str, source: str, f: FieldNames, index: int) -> Pair:
    def err(message: str, fld: str | None = None) -> DataError:
        return DataError(source, message, where=where, field=fld)

    if not isinstance(row, dict):
        raise err(f"expected an object, got {type(row).__name__}")
    chosen = _conversation(row, f.chosen, f.prompt, err)
    rejected = _conversation(row, f.rejected, f.prompt, err)
    pair_id = row.get(f.id)
    pair_id = str(index) if pair_id is None or pair_id == "" else str(pair_id)
    subset = row.get(f.subset)
    subset = "" if subset is None else str(subset)
    category = category_for(subset or None, _opt_str(row.get(f.category)))
    margin = row.get(f.margin)
    if margin is not None:
        try:
            margin = float(margin)
        except (TypeError, ValueError):
            raise err(f"must be a number, got {margin!r}", f.margin) from None
        if not math.isfinite(margin):
            raise err(f"must be finite, got {margin!r}", f.margin)
    known = {f.prompt, f.chosen, f.rejected, f.id, f.subset, f.category, f.margin}
    extra = {k: v for k, v in row.items() if k not in known}
    return Pair(pair_id, chosen, rejected, subset, category, margin, extra)


def _opt_str(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _conversation(row: dict, response_field: str, prompt_field: str, err) -> tuple[dict, ...]:
    """Messages ending in the response: RewardBench form (strings) or TRL's message lists."""
    if response_field not in row or row[response_field] is None:
        raise err("missing", response_field)
    response = row[response_field]
    prompt = row.get(prompt_field)
    if isinstance(response, str):
        if not response.strip():
            raise err("empty", response_field)
        messages = [{"role": "assistant", "content": response}]
    elif isinstance(response, (list, tuple)):
        messages = _messages(response, response_field, err)
    else:
        raise err(f"must be a string or a list of messages, got {type(response).__name__}", response_field)

    if prompt is None:
        if len(messages) == 1 and isinstance(response, str):
            raise err("missing (needed when responses are plain strings)", prompt_field)
        return tuple(messages)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise err("empty", prompt_field)
        return ({"role": "user", "content": prompt}, *messages)
    if isinstance(prompt, (list, tuple)):
        return (*_messages(prompt, prompt_field, err), *messages)
    raise err(f"must be a string or a list of messages, got {type(prompt).__name__}", prompt_field)


def _messages(items, fld: str, err) -> list[dict]:
    if not items:
        raise err("empty list of messages", fld)
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise err(f"message {i} must be an object with 'role' and 'content'", fld)
        if not isinstance(m["content"], str):
            raise err(f"message {i} content must be a string, got {type(m['content']).__name__}", fld)
        out.append({"role": m["role"], "content": m["content"]})
    if not out[-1]["content"].strip():
        raise err("last message is empty", fld)
    return out


def _check_unique_ids(pairs: list[Pair], source: str) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(pairs):
        if p.pair_id in seen:
            raise DataError(source, f"duplicate pair id {p.pair_id!r} (rows {seen[p.pair_id]} and {i})", field="id")
        seen[p.pair_id] = i


def _take(pairs: list[Pair], n: int, mode: str) -> list[Pair]:
    if mode == "first" or n >= len(pairs):
        return pairs[:n]
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[(p.category, p.subset)].append(i)
    queues = [iter(v) for v in groups.values()]
    picked: list[int] = []
    while len(picked) < n:  # round-robin over (category, subset) groups, in file order within each
        for q in list(queues):
            i = next(q, None)
            if i is None:
                queues.remove(q)
            elif len(picked) < n:
                picked.append(i)
    return [pairs[i] for i in sorted(picked)]


# ----------------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class EncodedPair:
    pair: Pair
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    truncated: bool

    @property
    def identical(self) -> bool:
        return self.chosen_ids == self.rejected_ids


class PairEncoder:
    """Render each side with the tokenizer's chat template (when it has one and it is wanted) and
    tokenise it, keeping at most ``max_length`` tokens.

    A reward is read at the end of the response, so a side that is too long loses tokens from the
    START (``truncation="left"``, the default): the oldest prompt turns go first, the end of the
    response never. A leading special token (BOS, ``[CLS]``, ``<|im_start|>``) is kept in front.
    The two sides of a pair lose the same tokens where they share them (the prompt), so both keep one
    and the same prompt (and a causal model's pair still packs, :mod:`gradscope.packing`); only a
    side still too long after the shared tokens are gone loses its own.
    ``truncation="right"`` keeps the first tokens instead (gradscope's rule before 2026-12). Cut
    sides are counted as truncated; the tokenizer's own "longer than the maximum" warning is
    silenced, since nothing that long reaches the model."""

    def __init__(self, tokenizer, max_length: int = 1024, chat_template: bool = True, truncation: str = "left"):
        if truncation not in TRUNCATION_SIDES:
            raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {truncation!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.use_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def tokens(self, messages: Iterable[dict]) -> list[int]:
        messages = list(messages)
        if self.use_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        else:
            text = "\n\n".join(m["content"] for m in messages)
            ids = self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        return list(ids)

    def truncate(self, ids: list[int]) -> tuple[list[int], bool]:
        """``ids`` cut to ``max_length`` by the truncation rule, and whether it was cut."""
        n = self.max_length
        if len(ids) <= n:
            return ids, False
        if self.truncation == "right":
            return ids[:n], True
        keep_head = 1 if ids[0] in self._special else 0
        return ids[:keep_head] + ids[len(ids) - (n - keep_head):], True

    def encode(self, pair: Pair) -> EncodedPair:
        c, r = self.tokens(pair.chosen), self.tokens(pair.rejected)
        over = max(len(c), len(r)) - self.max_length
        if over > 0 and self.truncation == "left":  # the shared tokens go first, from both sides alike
            keep_head = 1 if c[0] in self._special else 0
            drop = max(0, min(over, shared_prefix_length(c, r) - keep_head))
            c, r = c[:keep_head] + c[keep_head + drop:], r[:keep_head] + r[keep_head + drop:]
        (c, _), (r, _) = self.truncate(c), self.truncate(r)
        return EncodedPair(pair, tuple(c), tuple(r), over > 0)


def collate(encoded: list[EncodedPair], pad_id: int = 0, padding_side: str = "right"):
    """Pad a list of encoded pairs to ``input_ids, attention_mask`` of shape (B, 2, T)."""
    if not encoded:
        raise ValueError("collate: empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded)
    ids = torch.full((len(encoded), 2, T), pad_id, dtype=torch.long)  # (B, 2, T)
    mask = torch.zeros((len(encoded), 2, T), dtype=torch.long)
    for b, e in enumerate(encoded):
        for s, seq in enumerate((e.chosen_ids, e.rejected_ids)):
            n = len(seq)
            sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
            ids[b, s, sl] = torch.tensor(seq, dtype=torch.long)
            mask[b, s, sl] = 1
    return ids, mask


def collate_batch(encoded: list[EncodedPair], pad_id: int = 0, padding_side: str = "right",
                  pack: bool = False) -> Collated:
    """A batch as the engines and the model take it: with ``pack`` (a causal model) and every pair
    packing (:func:`gradscope.packing.packs`; :func:`length_batches` batches such pairs together), one
    packed row per pair, else :func:`collate`'s (B, 2, T)."""
    if pack and all(packs(e.chosen_ids, e.rejected_ids) for e in encoded):
        return pack_rows([(e.chosen_ids, e.rejected_ids) for e in encoded], pad_id=pad_id, padding_side=padding_side)
    return Collated(*collate(encoded, pad_id=pad_id, padding_side=padding_side))


def _layout(e: EncodedPair, pack: bool) -> tuple[bool, int, int]:
    """(packed, row length, rows): a packed pair is one row of its packed length, else two rows of its longest side."""
    length = packed_length(e.chosen_ids, e.rejected_ids) if pack else None
    if length is not None:
        return True, length, 1
    return False, max(len(e.chosen_ids), len(e.rejected_ids)), 2


def length_batches(encoded: list[EncodedPair], batch_size: int, max_batch_tokens: int | None = None,
                   pack: bool = False) -> list[list[int]]:
    """Indices of ``encoded`` in batches of similar length, shortest first: at most ``batch_size``
    pairs, and at most ``max_batch_tokens`` padded tokens (rows × the longest row: pairs × 2 sides ×
    the longest side, or pairs × the longest packed row) per batch, so that long pairs go in smaller
    batches; a pair longer than the budget goes alone. With ``pack`` (a causal model), the pairs that
    pack are batched apart from those that do not, after them."""
    layouts = [_layout(e, pack) for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: layouts[i][:2])
    batches: list[list[int]] = []
    for i in order:
        packed, width, rows = layouts[i]  # the batch's longest row (sorted)
        last = batches[-1] if batches else None
        if (last is not None and len(last) < batch_size and layouts[last[0]][0] == packed
                and (max_batch_tokens is None or (len(last) + 1) * rows * width <= max_batch_tokens)):
            last.append(i)
        else:
            batches.append([i])
    return batches


def batching_summary(encoded: list[EncodedPair], batch_size: int, max_batch_tokens: int | None,
                     pack: bool = False) -> dict:
    """What :func:`length_batches` chose, for a run's summary: the batches, and with ``pack`` how many
    pairs packed and the real tokens run packed against unpacked."""
    batches = length_batches(encoded, batch_size, max_batch_tokens, pack)
    layouts = [_layout(e, pack) for e in encoded]
    padded = [len(b) * layouts[b[-1]][2] * max(layouts[i][1] for i in b) for b in batches]
    out = {"batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "n_batches": len(batches),
           "largest_batch_pairs": max((len(b) for b in batches), default=0),
           "largest_batch_padded_tokens": max(padded, default=0), "pack": pack}
    if pack:
        unpacked = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)
        run = sum(lay[1] if lay[0] else len(e.chosen_ids) + len(e.rejected_ids) for e, lay in zip(encoded, layouts))
        out.update(packed_pairs=sum(lay[0] for lay in layouts), tokens_unpacked=unpacked, tokens_run=run)
    return out


def stack_chosen_rejected(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) -> (2B, ...) laid out as [chosen; rejected]."""
    return torch.cat([x[:, 0], x[:, 1]], dim=0)
