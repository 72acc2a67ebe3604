import os
import sys
from pathlib import Path

import pytest

# tests never touch a hub (set before transformers / huggingface_hub read it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRADSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_SHARED = os.environ.get("GRADSCOPE_REQUIRE_SHARED") == "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; CI sets GRADSCOPE_REQUIRE_SHARED=1, where its absence is a failure."""
    if not (SHARED_DATA / "rewardbench-v1.jsonl").exists():
        if REQUIRE_SHARED:
            pytest.fail(f"shared data not found at {SHARED_DATA} (GRADSCOPE_REQUIRE_SHARED=1)")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """HF's LlamaRMSNorm normalises in float32 even in a float64 model; in float64 here, so that the
    comparison sees the algebra, not that rounding."""
    import torch
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def killed_after_save(monkeypatch):
    """``killed_after_save(step, run)``: call ``run()`` with the trainer interrupted (KeyboardInterrupt)
    right after it saves the checkpoint of ``step``, as a kill would leave it."""
    import gradscope.train as train_mod

    real = train_mod.Trainer.save

    def kill(step: int, run) -> None:
        def save_then_die(self, s, target):
            real(self, s, target)
            if s == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(train_mod.Trainer, "save", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(train_mod.Trainer, "save", real)

    return kill
