"""probe_reading on a random tiny Qwen2-VL: the image evidence is the swapped-image NLL
minus the own-image NLL, so it is exactly 0 for a policy whose image features are constant
and not 0 for one whose features depend on the picture."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import probe_reading  # noqa: E402

from r1vl.data.synthetic import make_example  # noqa: E402
from r1vl.tiny import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    records = [make_example(0, i)[1] for i in range(30)]
    texts = [r["problem"] for r in records] + [r["solution"] for r in records]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), texts, seed=3)


def _blind_copy(policy_dir: Path, out: Path) -> Path:
    """The same checkpoint with the vision merger's last layer zeroed but for its bias: every
    image becomes the same features."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(policy_dir)
    last = model.model.visual.merger.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (policy_dir / name).is_file():
            (out / name).write_bytes((policy_dir / name).read_bytes())
    return out


def test_probe_reports_every_task_and_sees_the_picture_only_when_features_differ(tiny_policy, tmp_path):
    args = dict(n=6, tasks=("colour", "bars", "count"), seed=5, samples=2, temperature=1.2, max_new_tokens=6)
    seeing = probe_reading.probe(str(tiny_policy), **args)
    assert sorted(seeing) == ["bars", "colour", "count"]
    for r in seeing.values():
        assert r["records"] == 2 and 0 <= r["sampled"] <= 1 and 0 <= r["greedy"] <= 1
        assert sum(c for _, c in r["answers"]) == 2  # one greedy answer per record
    assert all(abs(r["evidence"]) > 1e-3 for r in seeing.values()), seeing
    blind = probe_reading.probe(str(_blind_copy(tiny_policy, tmp_path / "blind")), **args)
    assert all(r["evidence"] == 0.0 for r in blind.values()), blind


def test_probe_refuses_too_few_records(tiny_policy, capsys):
    with pytest.raises(SystemExit):
        probe_reading.main([str(tiny_policy), "--n", "3"])
    assert "n must give every task two records" in capsys.readouterr().err
