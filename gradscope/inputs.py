"""The input stage every command shares: data and model options (help written once) -> loaded inputs.

Each command's config inherits :class:`ModelOptions` and :class:`DataOptions`, so an input option is
declared once and means the same in correlate, train, evaluate and compare; the CLI is generated
from the fields. :func:`load_inputs` turns the options into the loaded model, the validated pairs,
the encoded pairs and the max length actually used; commands never load or encode on their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

from .config import opt
from .data import SAMPLE_MODES, EncodedPair, FieldNames, Pair, PairEncoder, load_pairs
from .model import ALIASES, DEFAULT_MODEL, DTYPES, POOLINGS, LoadedModel, fit_max_length, load_model

# the options of each group show under their own heading in every command's --help
model_opt = partial(opt, group="model options")
data_opt = partial(opt, group="data options")


@dataclass
class ModelOptions:
    """Which model, in which dtype, and how far to trust it."""

    model: str = model_opt(DEFAULT_MODEL, "Model: an alias (" + ", ".join(f"{k}: {v.description}" for k, v in
                           ALIASES.items()) + "), a local HF folder or gradscope checkpoint, a .gguf file, or a hub id.")
    dtype: str = model_opt("float32", "Model dtype for the computation.", choices=sorted(DTYPES))
    seed: int = model_opt(0, "Seed of a fresh reward head (a checkpoint's trained head is kept) and of every RNG.")
    trust_remote_code: bool = model_opt(False, "Allow model code from the model's repository (off: untrusted code "
                                        "never runs).")
    revision: str | None = model_opt(None, "Hub revision of the model.")
    pooling: str | None = model_opt(None, "What the reward head reads: last (the last real token), mean (over real "
                                    "tokens) or cls (the first token). Default: a checkpoint's own; else last for "
                                    "decoders, and for encoders what they ship (sentence-transformers' 1_Pooling: mean "
                                    "for MiniLM), else cls.", choices=list(POOLINGS))

    def load_model(self, source: str | None = None, dtype: str | None = None) -> LoadedModel:
        return load_model(source or self.model, dtype=dtype or self.dtype, seed=self.seed,
                          trust_remote_code=self.trust_remote_code, revision=self.revision, pooling=self.pooling)


@dataclass
class DataOptions:
    """Which pairs, and how they become tokens."""

    data: str = data_opt("demo", "Preference pairs: 'demo' (built-in, 64 pairs), a local .jsonl/.json/.parquet/.csv "
                         "file, a hub dataset id, or several joined by commas (--limit then applies to each).")
    split: str = data_opt("train", "Split, for hub dataset ids.")
    limit: int | None = data_opt(None, "Keep only N pairs (per source); see --sample.")
    sample: str = data_opt("first", "Which N pairs --limit keeps: the first N, or N spread evenly over the subsets "
                           "of every category.", choices=list(SAMPLE_MODES))
    max_length: int = data_opt(1024, "Tokens kept per side (prompt + response, capped by the model's positions); a "
                               "longer pair loses its oldest prompt tokens, on both sides alike, never the end of a "
                               "response, and is flagged.")
    chat_template: bool = data_opt(True, "Apply the tokenizer's chat template when it has one.")
    prompt_field: str = data_opt("prompt", "Row field holding the prompt (string or list of messages).")
    chosen_field: str = data_opt("chosen", "Row field holding the chosen response.")
    rejected_field: str = data_opt("rejected", "Row field holding the rejected response.")
    id_field: str = data_opt("id", "Row field holding the pair id (default: the row index).")
    subset_field: str = data_opt("subset", "Row field holding the subset name.")
    category_field: str = data_opt("category", "Row field holding the category (default: from the subset via "
                                   "RewardBench's sections, else 'all').")
    margin_field: str = data_opt("margin", "Row field holding the pair's margin (the margin losses).")

    def fields(self) -> FieldNames:
        return FieldNames(prompt=self.prompt_field, chosen=self.chosen_field, rejected=self.rejected_field,
                          id=self.id_field, subset=self.subset_field, category=self.category_field,
                          margin=self.margin_field)

    def load_pairs(self, source: str | None = None, limit: int | None | bool = True) -> list[Pair]:
        """The pairs of ``source`` (default ``data``), with ``limit``/``sample`` unless ``limit=False``."""
        n = self.limit if limit is True else (None if limit is False else limit)
        return load_pairs(source or self.data, split=self.split, fields=self.fields(), limit=n, sample=self.sample)


def max_batch_tokens_opt(default: int | None = None):
    """The batching budget of the commands that run batches of pairs (help written once)."""
    return opt(default, "Padded tokens per batch at most (pairs × 2 sides × longest side; packed pairs: pairs × the "
               "longest packed row): long pairs go in smaller batches, a pair over the budget alone; results do not "
               "depend on it. Memory grows with it, about in proportion.")


def pack_opt():
    """Packed pairs, for the commands that run the model on pairs (help written once)."""
    return opt(True, "Run each pair of a causal decoder as one row, [prompt; chosen rest; rejected rest], its shared "
               "prefix computed once (gradscope/packing.py): the same numbers from fewer tokens. Pairs whose shared "
               "prefix is missing or too short to pay, and encoders, run as two rows; --no-pack: always two rows.")


def option_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass
class Inputs:
    loaded: LoadedModel
    pairs: list[Pair]
    encoded: list[EncodedPair]
    max_length: int  # tokens per side actually used (--max-length capped by the model's positions)


def encode_pairs(loaded: LoadedModel, pairs: list[Pair], opts: DataOptions, log=None) -> tuple[list[EncodedPair], int]:
    """Encode ``pairs`` for ``loaded`` by the data options; return them and the max length used."""
    max_len = fit_max_length(loaded.model, opts.max_length)
    if max_len < opts.max_length and log is not None:
        log(f"note: --max-length {opts.max_length} exceeds the model's {max_len} positions; using {max_len}")
    encoder = PairEncoder(loaded.tokenizer, max_length=max_len, chat_template=opts.chat_template)
    return [encoder.encode(p) for p in pairs], max_len


def load_inputs(opts, *, pairs: list[Pair] | None = None, source: str | None = None, dtype: str | None = None,
                log=None) -> Inputs:
    """A command's inputs from its config (``ModelOptions`` + ``DataOptions``): the data first, so a
    bad file fails before a model loads; then the model (``source`` overrides ``opts.model``)."""
    pairs = opts.load_pairs() if pairs is None else pairs
    loaded = opts.load_model(source, dtype)
    encoded, max_len = encode_pairs(loaded, pairs, opts, log=log)
    return Inputs(loaded, pairs, encoded, max_len)
