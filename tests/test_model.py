import math

import pytest
import torch

from lingmao.model import PositionalEncoding, SimpleTransformer
from lingmao.module import WarmupCosine


def tiny_model(**kw) -> SimpleTransformer:
    args = dict(vocab_size=50, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.0, max_len=64)
    args.update(kw)
    return SimpleTransformer(**args)


def test_shapes():
    model = tiny_model()
    logits = model(torch.randint(0, 50, (3, 17)))
    assert logits.shape == (3, 17, 50)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("train_mode", [True, False])
def test_causal_future_tokens_do_not_change_past_logits(norm_first, train_mode):
    torch.manual_seed(0)
    model = tiny_model(norm_first=norm_first)
    model.train(train_mode)  # dropout is 0, so train mode is deterministic too
    x = torch.randint(0, 50, (2, 24))
    t = 11
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 50, (2, 24 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the check can fail: later positions do change


def test_causal_mask_matches_dense_mask_path():
    """The is_causal fast path computes what an explicit dense mask computes."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randint(0, 50, (2, 20))
    h = model.pos_encoder(model.embedding(x) * math.sqrt(model.d_model))
    mask = model.causal_mask(20)
    dense = h
    for layer in model.transformer.layers:
        dense = layer(dense, src_mask=mask, is_causal=False)
    dense = model.head(model.transformer.norm(dense))
    with torch.no_grad():
        assert torch.allclose(model(x), dense, atol=1e-5)


def test_tied_weights_share_storage_and_untied_do_not():
    tied = tiny_model(tie_weights=True)
    assert tied.head.weight.data_ptr() == tied.embedding.weight.data_ptr()
    untied = tiny_model(tie_weights=False)
    assert untied.head.weight.data_ptr() != untied.embedding.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 50 * 32


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="positional table"):
        tiny_model(max_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_positional_encoding_is_sinusoidal():
    pe = PositionalEncoding(8, max_len=10, dropout=0.0).pe
    assert pe[0, 0] == 0 and pe[0, 1] == 1
    assert torch.isclose(pe[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))))


def test_schedule_values():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)  # end of warm-up: full learning rate
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert s(110) == pytest.approx(0.1)  # the floor
    assert s(1000) == pytest.approx(0.1)
    s.scale = 0.75
    assert s(110) == pytest.approx(0.075)


def test_weight_decay_on_matrices_only():
    from lingmao.module import LingmaoLM

    optim = dict(lr=1e-3, weight_decay=0.1, warmup_steps=1, min_lr_ratio=0.1)
    lm = LingmaoLM(dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.0), optim, vocab_size=50)

    class FakeTrainer:
        estimated_stepping_batches = 10

    lm._trainer = FakeTrainer()  # configure_optimizers reads the step count from the trainer
    decay, no_decay = lm.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_params = len({id(p) for p in lm.model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
