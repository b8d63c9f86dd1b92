"""End-to-end: `python -m lingmao.train` on a cut of the corpus writes a checkpoint and an export that loads back."""

import json

import pytest
import torch

from lingmao import load_model

pytestmark = pytest.mark.slow


def test_train_checkpoint_export_reload(trained_run):
    run_dir, export_dir = trained_run.run_dir, trained_run.export_dir
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 30
    assert "unigram baseline" in trained_run.output

    loaded = load_model(export_dir)
    assert loaded.config["model"]["d_model"] == 32
    # The set of training lines that generation refuses to copy, and the file it came from.
    train = trained_run.tmp / "train.jsonl"
    assert loaded.lines is not None and loaded.lines.files == [str(train.resolve())]
    first = json.loads(train.read_text(encoding="utf-8").splitlines()[0])["text"]
    assert first.split("，")[0] in loaded.lines  # 秦川雄帝宅 (data.convert=none in the tiny run)
    # The export holds the trained weights: same logits as the checkpoint's model.
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    ids = torch.tensor([loaded.tokenizer.encode("床前明月光").ids])
    from lingmao.export import model_config_from_dict
    from lingmao.model import build_model

    reference = build_model(model_config_from_dict(loaded.config["model"]), loaded.config["vocab_size"])
    reference.load_state_dict(state)
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids), reference(ids), atol=1e-6)
