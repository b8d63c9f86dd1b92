import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lingmao.errors import LingmaoError
from lingmao.model import (
    GPT,
    SIZES,
    ModelConfig,
    PositionalEncoding,
    SimpleTransformer,
    apply_rope,
    build_model,
    rope_tables,
)

VOCAB = 50


def config(**kw) -> ModelConfig:
    args = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.0, max_len=64)
    args.update(kw)
    return ModelConfig(**args)


def gpt(**kw) -> GPT:
    model = GPT(config(**kw), VOCAB)
    for block in model.blocks:  # zero-initialised projections would make every block the identity
        nn.init.normal_(block.attn.proj.weight, std=0.2)
        nn.init.normal_(block.mlp.proj.weight, std=0.2)
    return model


def design(**kw) -> SimpleTransformer:
    return SimpleTransformer(config(arch="design", **kw), VOCAB)


# ----------------------------------------------------------------------------------------------
# ModelConfig
# ----------------------------------------------------------------------------------------------
def test_config_defaults_are_the_small_gpt():
    c = ModelConfig()
    assert (c.name, c.arch, c.activation) == ("small", "gpt", "relu2")
    assert {k: getattr(c, k) for k in SIZES["small"]} == SIZES["small"]
    assert ModelConfig(arch="design").activation == "gelu"  # null activation: the architecture's own


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"d_model": 32, "nhead": 3},
            "model.d_model=32 is not divisible by model.nhead=3; allowed nhead: 1, 2, 4, 8, 16, 32",
        ),
        ({"dropout": 1.0}, "model.dropout=1.0"),
        ({"arch": "rnn"}, "model.arch='rnn': not allowed; allowed: one of gpt, design"),
        ({"activation": "tanh"}, "allowed: null or one of relu2, swiglu, gelu, relu"),
        ({"activation": "relu"}, "model.activation=relu does not apply to model.arch=gpt; allowed: relu2, swiglu"),
        ({"arch": "design", "activation": "swiglu"}, "allowed: gelu, relu"),
        ({"d_model": 36, "nhead": 4}, "heads of 9 dimensions"),
        ({"norm_first": False}, "model.norm_first=false applies to model.arch=design only"),
        ({"num_layers": 0}, "model.num_layers=0"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(LingmaoError) as exc:
        ModelConfig(**overrides)
    text = str(exc.value)
    assert message in text and "\n" not in text
    if "dropout" in overrides:
        assert "[0, 1)" in text


def test_config_errors_surface_through_omegaconf():
    """Hydra builds the objects with OmegaConf.to_object, which runs __post_init__."""
    schema = OmegaConf.structured(ModelConfig)
    built = OmegaConf.to_object(OmegaConf.merge(schema, {"arch": "design", "tie_weights": True}))
    assert isinstance(built, ModelConfig) and built.activation == "gelu"
    with pytest.raises(LingmaoError, match=r"model\.dropout=1\.0"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"dropout": 1.0}))


def test_named_sizes():
    assert ModelConfig.of_size("tiny").d_model == 64
    assert ModelConfig.of_size("large", dropout=0.1).num_layers == 16
    with pytest.raises(LingmaoError, match="allowed: tiny, small, base, large"):
        ModelConfig.of_size("huge")


def test_build_model_picks_the_architecture():
    assert type(build_model(config(), VOCAB)) is GPT
    assert type(build_model(config(arch="design"), VOCAB)) is SimpleTransformer


# ----------------------------------------------------------------------------------------------
# Both architectures
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [gpt, design])
def test_shapes_and_attributes(make):
    model = make()
    assert model(torch.randint(0, VOCAB, (3, 17))).shape == (3, 17, VOCAB)
    assert (model.vocab_size, model.max_len, model.config.d_model) == (VOCAB, 64, 32)
    blocks = [m for m in model.modules() if isinstance(m, model.block_class)]
    assert len(blocks) == 2  # the unit FSDP wraps: one per layer


@pytest.mark.parametrize("make", [gpt, design, lambda **kw: gpt(activation="swiglu", **kw)])
@pytest.mark.parametrize("train_mode", [True, False])
def test_causal_future_tokens_do_not_change_past_logits(make, train_mode):
    torch.manual_seed(0)
    model = make()
    model.train(train_mode)  # dropout is 0, so train mode is deterministic too
    x = torch.randint(0, VOCAB, (2, 24))
    t = 11
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, VOCAB, (2, 24 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the check can fail: later positions do change


@pytest.mark.parametrize("make", [gpt, design])
def test_tied_weights_share_storage_and_untied_do_not(make):
    tied = make(tie_weights=True)
    assert tied.head.weight.data_ptr() == tied.embedding.weight.data_ptr()
    untied = make(tie_weights=False)
    assert untied.head.weight.data_ptr() != untied.embedding.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 32
    assert tied.num_parameters(non_embedding=True) == tied.num_parameters() - VOCAB * 32


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in matrix multiplies, counted from the modules themselves."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # a tied head counts here
    n += sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    return n


@pytest.mark.parametrize(
    "make", [gpt, design, lambda **kw: gpt(activation="swiglu", **kw), lambda **kw: gpt(tie_weights=True, **kw)]
)
def test_flops_per_token_counts_the_matrices(make):
    model = make()
    c, t = model.config, 100
    assert model.flops_per_token(t) == 6 * matmul_weights(model) + 12 * c.num_layers * t * c.d_model


@pytest.mark.parametrize("make", [gpt, design])
def test_too_long_input_is_refused(make):
    with pytest.raises(ValueError, match="table"):
        make(max_len=8)(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# GPT
# ----------------------------------------------------------------------------------------------
def test_gpt_has_no_biases_and_zero_initialised_output_projections():
    model = GPT(config(), VOCAB)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    # So every block starts as the identity: the logits are the head of the normed embedding.
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(x), model.head(model.norm(model.embedding(x))))


def test_gpt_activations_compute_what_they_say():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    relu2 = gpt(activation="relu2").blocks[0].mlp
    assert torch.allclose(relu2(x), relu2.proj(torch.relu(relu2.fc(x)) ** 2))
    swiglu = gpt(activation="swiglu").blocks[0].mlp
    assert torch.allclose(swiglu(x), swiglu.proj(torch.sigmoid(swiglu.gate(x)) * swiglu.gate(x) * swiglu.fc(x)))


def test_rope_scores_depend_on_distance_only():
    torch.manual_seed(0)
    cos, sin = rope_tables(64, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    # Position 0 is no rotation; position 1 turns the first pair by exactly 1 radian.
    assert torch.allclose(apply_rope(q.view(1, 1, 1, 8), cos[:1], sin[:1]).flatten(), q)
    turned = apply_rope(q.view(1, 1, 1, 8), cos[1:2], sin[1:2]).flatten()
    assert torch.allclose(turned[[0, 4]], torch.stack([q[0] * math.cos(1) - q[4] * math.sin(1),
                                                       q[0] * math.sin(1) + q[4] * math.cos(1)]))


def test_qk_norm_option():
    assert isinstance(gpt(qk_norm=True).blocks[0].attn.q_norm, nn.RMSNorm)
    assert isinstance(gpt(qk_norm=False).blocks[0].attn.k_norm, nn.Identity)


def test_gpt_state_dict_has_no_position_tables():
    keys = set(gpt().state_dict())
    assert not any("rope" in k for k in keys)
    assert "blocks.0.attn.q_norm.weight" in keys and "head.weight" in keys


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_incremental_decoding_matches_the_full_forward(activation):
    torch.manual_seed(0)
    model = gpt(activation=activation).eval()
    x = torch.randint(0, VOCAB, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 40)
        steps = [model(x[:, :12], cache=cache)]  # the prompt at once, then one token at a time
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(12, 30)]
    assert all(s.shape == (3, 1, VOCAB) for s in steps)
    assert cache.length == 30
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 11:], atol=1e-5)


def test_cache_misuse_is_refused():
    model = gpt().eval()
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="one new token at a time"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    for _ in range(4):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 8 tokens"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_torch_compile_captures_the_whole_forward():
    """fullgraph=True fails on any graph break. The eager backend runs the captured graph as it is: inductor's
    C++ build of it takes minutes on two busy cores (docs/model.md has that check)."""
    torch.manual_seed(0)
    model = gpt(d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    x = torch.randint(0, VOCAB, (2, 12))
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-5)
    out.sum().backward()
    assert model.blocks[0].attn.q.weight.grad is not None


@pytest.mark.slow  # two captures by dynamo: seconds
def test_a_compiled_training_step_is_one_graph_of_forward_and_loss():
    """model.compile=true compiles the forward pass and the loss together, and the optimizer's update: the
    forward-and-loss function is captured without a graph break, and the Newton-Schulz iteration of Muon too
    (the eager backend again; the GPU script's dry run builds them with inductor)."""
    from lingmao.module import LingmaoLM
    from lingmao.optim import Muon, orthogonalize

    torch.manual_seed(0)
    config = {"arch": "gpt", "d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32, "compile": True}
    lm = LingmaoLM(config, {"name": "muon"}, VOCAB)
    assert lm._compiled_loss is not None and lm._compiled_forward is not None
    x, y = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    loss = torch.compile(lm._forward_loss, backend="eager", fullgraph=True)(x, y)
    assert torch.allclose(loss, lm.loss(lm.model(x), y), atol=1e-6)
    opt = lm.configure_optimizers()
    muon = next(o for o in opt.optimizers if isinstance(o, Muon))
    assert muon._orthogonalize is not orthogonalize  # the compiled iteration is the one the step uses
    g = torch.randn(16, 32)
    whole = torch.compile(orthogonalize, backend="eager", fullgraph=True, dynamic=False)(g, 5, (3.4445, -4.775, 2.0315),
                                                                                         1e-7, torch.float32)
    assert torch.allclose(whole, orthogonalize(g, 5, (3.4445, -4.775, 2.0315), 1e-7, torch.float32), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# SimpleTransformer (the design)
# ----------------------------------------------------------------------------------------------
def test_design_state_dict_keys_are_those_of_earlier_checkpoints():
    layer = [
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    ]
    expected = {"embedding.weight", "head.weight", "transformer.norm.weight", "transformer.norm.bias"}
    expected |= {f"transformer.layers.{i}.{k}" for i in range(2) for k in layer}
    assert set(design().state_dict()) == expected


def test_design_causal_mask_matches_dense_mask_path():
    """The is_causal fast path computes what an explicit dense mask computes."""
    torch.manual_seed(0)
    model = design().eval()
    x = torch.randint(0, VOCAB, (2, 20))
    h = model.pos_encoder(model.embedding(x) * math.sqrt(model.d_model))
    mask = model.causal_mask(20)
    dense = h
    for layer in model.transformer.layers:
        dense = layer(dense, src_mask=mask, is_causal=False)
    dense = model.head(model.transformer.norm(dense))
    with torch.no_grad():
        assert torch.allclose(model(x), dense, atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_design_options_reach_the_layers(norm_first):
    model = design(norm_first=norm_first, activation="relu")
    layer = model.transformer.layers[0]
    assert layer.norm_first is norm_first and layer.activation_relu_or_gelu == 1  # 1 = relu
    assert (model.transformer.norm is not None) is norm_first


def test_positional_encoding_is_sinusoidal():
    pe = PositionalEncoding(8, max_len=10, dropout=0.0).pe
    assert pe[0, 0] == 0 and pe[0, 1] == 1
    assert torch.isclose(pe[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))))
