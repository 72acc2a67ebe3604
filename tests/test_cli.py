"""Every command takes the shared model and data options, with the same meaning and help."""

import dataclasses

import pytest

from gradscope.cli import CONFIG_COMMANDS, _config_class, build_parser, config_from_args
from gradscope.inputs import DataOptions, ModelOptions

SHARED = [f for cls in (ModelOptions, DataOptions) for f in dataclasses.fields(cls)]
VALUES = {"model": "m", "dtype": "float64", "seed": "7", "revision": "r1", "data": "d.jsonl", "split": "test",
          "limit": "5", "sample": "stratified", "max_length": "99", "prompt_field": "q", "chosen_field": "good",
          "rejected_field": "bad", "id_field": "uid", "subset_field": "s", "category_field": "c", "margin_field": "gap",
          "pooling": "mean"}
FLAGS = {"trust_remote_code": "--trust-remote-code", "chat_template": "--no-chat-template"}


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_every_command_accepts_the_shared_options(command):
    cls = _config_class(CONFIG_COMMANDS[command][3])
    assert issubclass(cls, ModelOptions) and issubclass(cls, DataOptions)
    positional = [f"x{i}" for i, f in enumerate(dataclasses.fields(cls)) if f.metadata.get("positional")]
    argv = [command, *positional]
    for f in SHARED:
        argv += [FLAGS[f.name]] if f.name in FLAGS else ["--" + f.name.replace("_", "-"), VALUES[f.name]]
    cfg = config_from_args(cls, build_parser(only=command).parse_args(argv))
    got = {f.name: getattr(cfg, f.name) for f in SHARED}
    want = {**{k: type(getattr(cfg, k))(v) if k not in ("limit", "seed", "max_length") else int(v)
               for k, v in VALUES.items()}, "trust_remote_code": True, "chat_template": False}
    if command == "evaluate":  # --model is repeatable there (one row per model)
        want["model"] = ["m"]
    assert got == want
    assert cfg.fields().margin == "gap" and cfg.fields().prompt == "q"


def test_shared_help_is_written_once():
    """Each shared option has the same help in every command (only defaults may differ per command)."""
    helps = {}
    for command, spec in CONFIG_COMMANDS.items():
        fields = {f.name: f for f in dataclasses.fields(_config_class(spec[3]))}
        for f in SHARED:
            if fields[f.name].metadata is not f.metadata:  # overridden: model (evaluate, compare), defaults
                assert (command, f.name) in {("evaluate", "model"), ("compare", "model"), ("train", "max_length"),
                                             ("align", "limit")}
                if f.name in ("max_length", "limit"):
                    assert fields[f.name].metadata["help"] == f.metadata["help"]
            helps.setdefault(f.name, set()).add(fields[f.name].metadata["help"])
    assert all(len(h) == 1 for name, h in helps.items() if name != "model")
