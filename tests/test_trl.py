"""The README's NormBT-in-trl snippet, run as written, against a hand computation on a tiny model."""

import json
import re
from pathlib import Path

import pytest
import torch

from gradscope.data import demo_path
from gradscope.losses import EPS

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    m = re.search(r"<!-- trl-snippet -->\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its <!-- trl-snippet --> block"
    return m.group(1)


# trl's RewardConfig sets the old `gradient_checkpointing` name itself
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_readme_normbt_reward_trainer_matches_a_hand_computation(tmp_path):
    pytest.importorskip("trl", reason="the test extras install trl")
    from datasets import Dataset
    from tiny import tiny_llama_config, tiny_tokenizer
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig

    namespace: dict = {}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)
    trainer_cls = namespace["NormBTRewardTrainer"]

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(
        len(tok), max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id))
    rows = [json.loads(line) for line in demo_path().read_text().splitlines()[:4]]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    # bf16=False: trl defaults to bf16 autocast, which the float32 hand computation would not match
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0, bf16=False,
                        disable_tqdm=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tok)

    # by hand, before the step, each sequence alone (no padding): r and h at its last token
    model.eval()
    r, h = {}, {}
    with torch.no_grad():
        for ex in trainer.train_dataset:
            for side in ("chosen", "rejected"):
                out = model(torch.tensor([ex[f"{side}_ids"]]), output_hidden_states=True)
                r.setdefault(side, []).append(out.logits[0, 0])
                h.setdefault(side, []).append(out.hidden_states[-1][0, -1])
    d = torch.stack(r["chosen"]) - torch.stack(r["rejected"])
    dist = (torch.stack(h["chosen"]) - torch.stack(h["rejected"])).norm(dim=-1)
    mu = dist.mean()  # first batch: μ initialised to its mean, then read
    expected = (mu / (dist + EPS) * -torch.nn.functional.logsigmoid(d)).mean()
    assert not torch.allclose(dist, dist.mean()), "distances must differ for the weights to matter"

    result = trainer.train()
    assert float(trainer.normbt.mu) == pytest.approx(float(mu), rel=1e-5)
    assert result.training_loss == pytest.approx(float(expected), rel=1e-5)
    bt = float(-torch.nn.functional.logsigmoid(d).mean())
    assert abs(bt - float(expected)) > 1e-4, "the NormBT loss should differ from plain BT here"
