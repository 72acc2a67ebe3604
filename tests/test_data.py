"""Loading, validation and tokenisation of preference pairs; one-line errors from the CLI."""

import json

import pandas as pd
import pytest
import torch

from gradscope.cli import main
from gradscope.data import FieldNames, PairEncoder, collate, load_pairs
from gradscope.errors import DataError
from gradscope.packing import shared_prefix_length
from tiny import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "prompt": "p", "chosen": "yes", "rejected": "no", "subset": "hep-go"}


def test_rewardbench_rows_and_category_from_subset(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "id": "b", "subset": "mystery"},
                                           {**GOOD, "id": "c", "category": "mine"}])
    pairs = load_pairs(f)
    assert [p.category for p in pairs] == ["reasoning", "all", "mine"]
    assert pairs[0].chosen == ({"role": "user", "content": "p"}, {"role": "assistant", "content": "yes"})


def test_trl_conversational_rows(tmp_path):
    conv = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    explicit = {"prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "assistant", "content": "go away"}]}
    f = write_jsonl(tmp_path / "c.jsonl", [conv, explicit])
    a, b = load_pairs(f)
    assert a.chosen == b.chosen and a.rejected == b.rejected
    assert (a.pair_id, b.pair_id) == ("0", "1") and a.category == "all"


def test_parquet_csv_json_and_field_names(tmp_path):
    rows = [{"q": "p1", "good": "c1", "bad": "r1"}, {"q": "p2", "good": "c2", "bad": "r2"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    names = FieldNames(prompt="q", chosen="good", rejected="bad")
    for suffix in ("parquet", "csv", "json"):
        pairs = load_pairs(tmp_path / f"d.{suffix}", fields=names)
        assert [p.chosen[-1]["content"] for p in pairs] == ["c1", "c2"], suffix


def test_limit_first_and_stratified(tmp_path):
    rows = [{**GOOD, "id": str(i), "category": "a" if i < 6 else "b"} for i in range(8)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [p.pair_id for p in load_pairs(f, limit=3)] == ["0", "1", "2"]
    assert [p.pair_id for p in load_pairs(f, limit=4, sample="stratified")] == ["0", "1", "6", "7"]


@pytest.mark.parametrize("rows,expected", [
    (["{not json"], "line 1: malformed JSON"),
    ([GOOD, {k: v for k, v in GOOD.items() if k != "chosen"}], "line 2: field 'chosen': missing"),
    ([{**GOOD, "rejected": "   "}], "line 1: field 'rejected': empty"),
    ([{**GOOD, "chosen": 3}], "line 1: field 'chosen': must be a string or a list of messages, got int"),
    ([{k: v for k, v in GOOD.items() if k != "prompt"}], "line 1: field 'prompt': missing"),
    ([{**GOOD, "chosen": [{"role": "assistant", "content": 5}]}], "field 'chosen': message 0 content"),
    ([GOOD, GOOD], "duplicate pair id 'a'"),
    ([{**GOOD, "margin": "big"}], "line 1: field 'margin': must be a number"),
], ids=["malformed", "missing", "empty", "non-string", "no-prompt", "bad-message", "duplicate", "margin"])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, expected):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_pairs(f)
    assert str(e.value).startswith(str(f)) and expected in str(e.value)


def test_missing_file():
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_pairs("nope.jsonl")


@pytest.mark.parametrize("args,expected", [
    (["--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--data", "{tmp}/bad.jsonl"], "bad.jsonl: line 2: field 'rejected': missing"),
    (["--model", "{tmp}/no-such-model-dir"], "no-such-model-dir"),
    (["--model", "not-an-org/not-a-model-gradscope"], "unknown model 'not-an-org/not-a-model-gradscope'"),
], ids=["missing-file", "bad-row", "missing-model-dir", "unknown-hub-model"])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, expected, tiny_model_dir):
    write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"id": "x", "prompt": "p", "chosen": "c"}])
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    code = main(["correlate", *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("gradscope: error: ") and expected in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def _long_prompt_pair():
    from gradscope.data import Pair

    prompt = {"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 6}
    return Pair("x", (prompt, {"role": "assistant", "content": "def f(x): return x + 1"}),
                (prompt, {"role": "assistant", "content": "def f(x): return x + 2"}), "", "all")


def test_truncation_drops_the_oldest_prompt_tokens_and_keeps_the_response_end():
    tok = tiny_tokenizer()
    p = _long_prompt_pair()
    full = PairEncoder(tok, max_length=10_000, chat_template=False).encode(p)
    e = PairEncoder(tok, max_length=12, chat_template=False).encode(p)
    assert e.truncated and not e.identical and max(len(e.chosen_ids), len(e.rejected_ids)) == 12
    # both sides lose the same oldest tokens (the longer side is cut to 12), so they keep one prompt
    drop = max(len(full.chosen_ids), len(full.rejected_ids)) - 12
    assert e.chosen_ids == full.chosen_ids[drop:] and e.rejected_ids == full.rejected_ids[drop:]
    assert shared_prefix_length(e.chosen_ids, e.rejected_ids) == shared_prefix_length(full.chosen_ids,
                                                                                       full.rejected_ids) - drop > 0
    # the old rule kept the first tokens: the responses were cut off and the pair became identical
    right = PairEncoder(tok, max_length=12, chat_template=False, truncation="right").encode(p)
    assert right.identical and right.chosen_ids == full.chosen_ids[:12]
    ids, mask = collate([e, e], pad_id=0, padding_side="left")
    assert ids.shape == (2, 2, 12) and mask.sum() == 2 * (len(e.chosen_ids) + len(e.rejected_ids))


def test_truncation_keeps_a_leading_special_token_and_the_end_on_an_encoder():
    from gradscope.model import load_model

    tok = load_model("minilm").tokenizer  # BERT: [CLS] ... [SEP]
    p = _long_prompt_pair()
    full = PairEncoder(tok, max_length=10_000).encode(p)
    e = PairEncoder(tok, max_length=16).encode(p)
    assert e.truncated and len(e.chosen_ids) == 16
    assert e.chosen_ids[0] == tok.cls_token_id and e.chosen_ids[1:] == full.chosen_ids[-15:]
    assert e.chosen_ids[-1] == tok.sep_token_id and e.chosen_ids != e.rejected_ids


def test_split_by_prompt_never_puts_a_prompt_on_both_sides(shared_data):
    from gradscope.data import prompt_key, split_by_prompt

    pairs = load_pairs(str(shared_data / "train-reasoning.jsonl"))  # prompts repeat: several bugs per problem
    assert len({prompt_key(p) for p in pairs}) < len(pairs) / 2
    train, val = split_by_prompt(pairs, 0.2)
    assert len(train) + len(val) == len(pairs) and 0.15 < len(val) / len(pairs) < 0.25
    assert not {prompt_key(p) for p in train} & {prompt_key(p) for p in val}
    # a pair's side depends on its prompt alone: a subset splits the same way
    sub_train, sub_val = split_by_prompt(pairs[::7], 0.2)
    assert {p.pair_id for p in sub_val} == {p.pair_id for p in val} & {p.pair_id for p in pairs[::7]}


def test_several_sources_joined_by_commas(shared_data):
    hh, rs = shared_data / "train-hh-rlhf.jsonl", shared_data / "train-reasoning.jsonl"
    both = load_pairs(f"{hh},{rs}", limit=10, sample="stratified")
    assert [p.pair_id for p in both] == [p.pair_id for p in load_pairs(hh, limit=10, sample="stratified")
                                          + load_pairs(rs, limit=10, sample="stratified")]


ROWS = [GOOD, {**GOOD, "id": "b", "chosen": "café ☕", "prompt": "naïve?"}]


def _as(fmt: str, path, rows):
    import pandas as pd

    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False)
    return pd.DataFrame(rows).to_csv(index=False)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_utf8_byte_order_mark_loads_the_same_table(tmp_path, fmt):
    plain, bom = tmp_path / f"plain.{fmt}", tmp_path / f"bom.{fmt}"
    text = _as(fmt, plain, ROWS)
    plain.write_bytes(text.encode("utf-8"))
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    a, b = load_pairs(plain), load_pairs(bom)
    assert [(p.pair_id, p.chosen, p.rejected) for p in a] == [(p.pair_id, p.chosen, p.rejected) for p in b]
    assert a[1].chosen[-1]["content"] == "café ☕"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_latin1_file_exits_2_naming_its_line(tmp_path, capsys, fmt, tiny_model_dir):
    f = tmp_path / f"latin1.{fmt}"
    f.write_bytes(_as(fmt, f, ROWS).encode("latin-1", errors="replace").replace(b"?", b"\xe9"))
    with pytest.raises(DataError) as e:
        load_pairs(f)
    assert "not UTF-8" in str(e.value) and str(e.value).startswith(f"{f}: line ")
    out = tmp_path / "out"
    code = main(["correlate", "--data", str(f), "--model", str(tiny_model_dir), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not UTF-8" in err[-1] and "Traceback" not in "\n".join(err) and not out.exists()


# ------------------------------------------------------------------------------ loading trusts nothing


class _Touch:
    """Unpickling this object creates a marker file: what a malicious weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("kind", ["plain", "malicious"])
def test_pickled_weights_are_refused_in_one_line_and_never_unpickled(tmp_path, capsys, kind):
    import pickle

    from tiny import tiny_backbone, tiny_tokenizer

    folder = tmp_path / "pickled"
    bb = tiny_backbone("llama")
    bb.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(bb.state_dict(), folder / "pytorch_model.bin")  # the old HF layout
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    marker = tmp_path / "pwned"
    if kind == "malicious":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    out = tmp_path / "out"
    code = main(["correlate", "--model", str(folder), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"gradscope: error: {folder / 'pytorch_model.bin'}: pickled weights are refused")
    assert not marker.exists() and not out.exists()


def test_a_float64_checkpoint_round_trips_bit_exact(tmp_path):
    from tiny import save_tiny_model_dir

    from gradscope.model import load_model, save_reward_model

    base = load_model(str(save_tiny_model_dir(tmp_path / "base")), dtype="float64", seed=3)
    with torch.no_grad():  # values that float32 cannot hold
        for p in base.model.parameters():
            p.add_(torch.randn_like(p) * 1e-9)
    save_reward_model(base.model, base.tokenizer, tmp_path / "ckpt", {"step": 0})
    again = load_model(str(tmp_path / "ckpt"), dtype="float64")
    a, b = base.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float64 and torch.equal(a[k], b[k]), k


def test_a_local_folder_that_fails_to_load_says_so(tmp_path):
    from gradscope.errors import ModelError
    from gradscope.model import load_model

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="broken: the local model folder failed to load"):
        load_model(str(tmp_path / "broken"))


def test_truncation_on_a_chat_template_keeps_its_start_token_and_the_response_end():
    from transformers import AutoTokenizer

    from gradscope.model import alias_path

    tok = AutoTokenizer.from_pretrained(alias_path("smollm2"))  # SmolLM2: <|im_start|>system ... <|im_end|>\n
    p = _long_prompt_pair()
    full = PairEncoder(tok, max_length=10_000).encode(p)
    e = PairEncoder(tok, max_length=24).encode(p)
    assert e.truncated and len(e.chosen_ids) == len(e.rejected_ids) == 24 and not e.identical
    assert e.chosen_ids[0] == full.chosen_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert e.chosen_ids[1:] == full.chosen_ids[-23:] and "return x + 1" in tok.decode(e.chosen_ids)
