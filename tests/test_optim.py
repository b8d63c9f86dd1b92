import io
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lingmao.errors import LingmaoError
from lingmao.model import GPT, ModelConfig, SimpleTransformer
from lingmao.optim import (
    MultiOptimizer,
    Muon,
    MuonConfig,
    OptimConfig,
    apply_schedule,
    build_optimizer,
    check_strategy,
    group_schedule,
    orthogonalize,
    split_parameters,
    warmup_cosine,
)

VOCAB = 40


def tiny(arch: str = "gpt", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, max_len=16, **kw)
    return (GPT if arch == "gpt" else SimpleTransformer)(cfg, VOCAB)


def names_of(model: torch.nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"lr": 0.0}, ["optim.lr=0.0", "> 0"]),
        ({"warmup_steps": -5}, ["optim.warmup_steps=-5", ">= 0"]),
        ({"betas": [0.9]}, ["optim.betas", "two numbers"]),
        ({"betas": [0.9, 1.5]}, ["optim.betas", "two numbers"]),
        ({"name": "sgd"}, ["optim.name='sgd'", "adamw, muon"]),
        ({"min_lr_ratio": 2.0}, ["optim.min_lr_ratio=2.0", "[0, 1]"]),
        ({"max_grad_norm": 0.0}, ["optim.max_grad_norm=0.0"]),
    ],
)
def test_config_errors_name_the_key(overrides, words):
    with pytest.raises(LingmaoError) as exc:
        OptimConfig(**overrides)
    assert all(w in str(exc.value) for w in words) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [({"lr": -1.0}, ["optim.muon.lr=-1.0"]), ({"momentum": 1.0}, ["optim.muon.momentum=1.0", "[0, 1)"]),
     ({"adjust_lr": "x"}, ["optim.muon.adjust_lr", "original, match_rms_adamw"])],
)
def test_muon_config_errors_name_the_nested_key(overrides, words):
    with pytest.raises(LingmaoError) as exc:
        MuonConfig(**overrides)
    assert all(w in str(exc.value) for w in words)


def test_nested_config_through_omegaconf():
    schema = OmegaConf.structured(OptimConfig)
    built = OmegaConf.to_object(OmegaConf.merge(schema, {"name": "muon", "muon": {"lr": 0.05}}))
    assert isinstance(built.muon, MuonConfig) and built.muon.lr == 0.05 and built.max_grad_norm == 1.0
    with pytest.raises(LingmaoError, match=r"optim\.muon\.ns_steps=0"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"muon": {"ns_steps": 0}}))


def test_muon_is_refused_only_under_strategies_that_flatten_the_matrices():
    check_strategy(OptimConfig(name="muon"), "ddp")
    check_strategy(OptimConfig(name="muon"), "fsdp")  # FSDP2: whole matrices gathered (lingmao/fsdp.py)
    check_strategy(OptimConfig(name="adamw"), "deepspeed")
    with pytest.raises(LingmaoError, match="optim.name=muon does not work with hardware.strategy=deepspeed"):
        check_strategy(OptimConfig(name="muon"), "deepspeed")


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt", "design"])
def test_adamw_decays_matrices_only(arch):
    model = tiny(arch)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert (decay["name"], decay["weight_decay"], no_decay["weight_decay"]) == ("decay", 0.1, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ["gpt", "design"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(arch):
    model = tiny(arch)
    opt = build_optimizer(model, OptimConfig(name="muon"))
    assert isinstance(opt, MultiOptimizer)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    hidden = names_of(model, muon.param_groups[0]["params"])
    # Expected by looking at the modules: every 2-D weight inside a block, nothing else.
    blocks = model.blocks if arch == "gpt" else model.transformer.layers
    expected = {
        f"{prefix}.{i}.{name}"
        for i, block in enumerate(blocks)
        for name, p in block.named_parameters()
        if p.dim() == 2
        for prefix in (["blocks"] if arch == "gpt" else ["transformer.layers"])
    }
    assert hidden == expected and hidden
    rest = names_of(model, [p for g in adamw.param_groups for p in g["params"]])
    assert rest.isdisjoint(hidden) and rest | hidden == {n for n, _ in model.named_parameters()}
    assert "embedding.weight" in rest and "head.weight" in rest
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "muon"]


def test_groups_are_chosen_by_name_for_flat_shards():
    """Under FSDP the optimizer sees 1-D shards with wrapper prefixes; the names still decide."""
    flat = [
        ("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn.q.weight", torch.nn.Parameter(torch.zeros(8))),
        ("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn_norm.weight", torch.nn.Parameter(torch.zeros(4))),
        ("_fsdp_wrapped_module.embedding.weight", torch.nn.Parameter(torch.zeros(8))),
    ]
    split = split_parameters(flat, muon=False)
    assert [len(split.hidden), len(split.decay), len(split.no_decay)] == [0, 2, 1]
    assert split.decay[0] is flat[0][1] and split.no_decay[0] is flat[1][1]
    with pytest.raises(LingmaoError, match=r"optim.name=muon: parameter .*attn\.q\.weight has shape \(8,\)"):
        split_parameters(flat, muon=True)


def test_multi_optimizer_shares_groups_and_state():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    adamw, muon = opt.optimizers
    assert opt.param_groups[0] is adamw.param_groups[0] and opt.param_groups[-1] is muon.param_groups[0]
    train(model, opt, None, steps=1)
    assert adamw.state is opt.state is muon.state
    buffers = [opt.state[p] for p in muon.param_groups[0]["params"]]
    assert all("momentum_buffer" in s for s in buffers)  # Muon really stepped its parameters
    assert all("exp_avg" in opt.state[p] for p in adamw.param_groups[0]["params"])


# ----------------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_in_bfloat16_steps_exactly_as_torch(adjust):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(24, 8)), torch.nn.Parameter(torch.randn(8, 24))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust)
    a, b = Muon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(theirs, **kw)
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(ours, start, strict=True))  # they did move
    assert set(a.state[ours[0]]) == set(b.state[theirs[0]]) == {"momentum_buffer"}


def test_float32_newton_schulz_orthogonalizes():
    torch.manual_seed(0)
    g = torch.randn(48, 16)
    x = orthogonalize(g, 5, (3.4445, -4.775, 2.0315), 1e-7, torch.float32)
    assert x.dtype == torch.float32 and x.shape == g.shape
    singular = torch.linalg.svdvals(x)
    assert singular.min() > 0.5 and singular.max() < 1.5  # roughly U V^T (the quintic stops short of 1)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(x.flatten(), (u @ vh).flatten(), dim=0) > 0.95
    bf16 = orthogonalize(g, 5, (3.4445, -4.775, 2.0315), 1e-7, torch.bfloat16).float()
    assert (x - bf16).abs().max() < 0.05


def test_muon_on_cpu_defaults_to_float32():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    assert isinstance(opt.optimizers[1], Muon) and opt.optimizers[1].ns_dtype is None
    before = [p.detach().clone() for p in opt.optimizers[1].param_groups[0]["params"]]
    train(model, opt, None, steps=2)
    after = opt.optimizers[1].param_groups[0]["params"]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ----------------------------------------------------------------------------------------------
# Resume: exact
# ----------------------------------------------------------------------------------------------
def batches(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 13), generator=torch.Generator().manual_seed(1000 + step))


def schedules_of(opt, cfg: OptimConfig) -> list[tuple[float, int, float]]:
    """What LingmaoLM.configure_optimizers keeps: each group's (peak, warm-up, floor) from the config."""
    return [group_schedule(cfg, group) for group in opt.param_groups]


def train(model, opt, schedules, steps: int, first: int = 0, clip: float | None = 1.0, total: int = 8) -> None:
    """`steps` optimizer steps from step `first`, the learning rates set before each as the app sets them."""
    for step in range(first, first + steps):
        if schedules is not None:
            apply_schedule(opt, schedules, step, total)
        x = batches(step)
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_resume_from_a_saved_state_is_exact(name):
    cfg = OptimConfig(name=name, warmup_steps=2, muon=MuonConfig(weight_decay=0.01, warmup_steps=3))
    straight = tiny()
    opt = build_optimizer(straight, cfg)
    train(straight, opt, schedules_of(opt, cfg), 8)

    first = tiny()
    opt = build_optimizer(first, cfg)
    train(first, opt, schedules_of(opt, cfg), 4)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = tiny()  # fresh weights and optimizer, as a new process would build them
    opt = build_optimizer(resumed, cfg)
    schedules = schedules_of(opt, cfg)  # taken before the load, as the app does
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    if name == "muon":
        assert opt.optimizers[1].state is opt.state  # still shared after the load
    train(resumed, opt, schedules, 4, first=4)

    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # The check can fail: the same steps without the optimizer state end elsewhere.
    lost = tiny()
    lost.load_state_dict(saved["model"])
    opt = build_optimizer(lost, cfg)
    train(lost, opt, schedules_of(opt, cfg), 4, first=4)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), lost.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def test_warmup_cosine_values():
    def f(step: int) -> float:
        return warmup_cosine(step, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)

    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)  # end of warm-up: full learning rate
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1)  # the floor
    assert f(1000) == pytest.approx(0.1)
    assert warmup_cosine(0, 0, 10, 0.0) == pytest.approx(1.0)  # no warm-up


def lrs(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


def test_each_group_follows_its_own_config():
    cfg = OptimConfig(name="muon", lr=1e-3, warmup_steps=4, min_lr_ratio=0.1,
                      muon=MuonConfig(lr=0.02, warmup_steps=0, min_lr_ratio=0.0))
    opt = build_optimizer(tiny(), cfg)
    schedules = schedules_of(opt, cfg)
    seen = []
    for step in range(21):
        apply_schedule(opt, schedules, step, 20)
        seen.append(lrs(opt))
    assert seen[0]["decay"] == pytest.approx(1e-3 * 0.25) and seen[0]["no_decay"] == seen[0]["decay"]
    assert seen[0]["muon"] == pytest.approx(0.02)  # no warm-up for Muon
    assert seen[12]["decay"] == pytest.approx(1e-3 * warmup_cosine(12, 4, 20, 0.1))
    assert seen[12]["muon"] == pytest.approx(0.02 * warmup_cosine(12, 0, 20, 0.0))
    assert seen[20]["muon"] == pytest.approx(0.0) and seen[20]["decay"] == pytest.approx(1e-4)  # the floors


def test_null_muon_schedule_settings_follow_adamw():
    cfg = OptimConfig(name="muon", warmup_steps=4, min_lr_ratio=0.3)
    opt = build_optimizer(tiny(), cfg)
    assert [s for g, s in zip(opt.param_groups, schedules_of(opt, cfg), strict=True) if g["name"] == "muon"] == [
        (cfg.muon.lr, 4, 0.3)]
    apply_schedule(opt, schedules_of(opt, cfg), 0, 20)
    assert lrs(opt)["muon"] == pytest.approx(cfg.muon.lr / 4)


def test_resumed_schedule_follows_the_config_it_is_given():
    """A checkpoint's optimizer state carries the old run's rates in its groups; the rates set before the next
    step are those of the new config (another peak, floor and length), at the step reached."""
    old = OptimConfig(lr=1e-3, warmup_steps=2)
    opt = build_optimizer(tiny(), old)
    for step in range(10):
        apply_schedule(opt, schedules_of(opt, old), step, 100, scale=0.5)  # a night
        opt.step()
    saved = opt.state_dict()

    new = OptimConfig(lr=3e-3, warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer(tiny(), new)
    schedules = schedules_of(opt, new)
    opt.load_state_dict(saved)
    assert lrs(opt)["decay"] == pytest.approx(1e-3 * warmup_cosine(9, 2, 100, 0.1) * 0.5)  # the old run's rate
    apply_schedule(opt, schedules, 10, 50)
    assert lrs(opt)["decay"] == pytest.approx(3e-3 * warmup_cosine(10, 2, 50, 0.0))
    apply_schedule(opt, schedules, 11, 50, warmup_cap=1)
    assert lrs(opt)["decay"] == pytest.approx(3e-3 * warmup_cosine(11, 1, 50, 0.0))


def test_scale_multiplies_every_group_at_once():
    cfg = OptimConfig(name="muon", warmup_steps=0)
    opt = build_optimizer(tiny(), cfg)
    schedules = schedules_of(opt, cfg)
    apply_schedule(opt, schedules, 1, 10)
    before = lrs(opt)
    apply_schedule(opt, schedules, 1, 10, scale=0.25)
    after = lrs(opt)
    assert set(before) == {"decay", "no_decay", "muon"}
    assert all(after[k] == pytest.approx(before[k] * 0.25) for k in before)
    assert after["muon"] == pytest.approx(cfg.muon.lr * warmup_cosine(1, 0, 10, 0.1) * 0.25)


def test_clipping_sees_every_group():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    x = batches(0)
    F.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(list(model.parameters()))
    total = torch.nn.utils.clip_grad_norm_(params, 1e-3)
    assert total > 1e-3
    assert math.isclose(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item(), 1e-3,
                        rel_tol=1e-3)


# ----------------------------------------------------------------------------------------------
# Under Lightning: one optimizer, clipping, accumulation, resume from a checkpoint file
# ----------------------------------------------------------------------------------------------
def test_lightning_trains_and_resumes_with_muon_exactly(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    cfg = OptimConfig(name="muon", warmup_steps=2, max_grad_norm=0.5, accumulation_steps=2)

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny()

        def training_step(self, batch, batch_idx):
            x = batch[0]
            return F.cross_entropy(self.model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return build_optimizer(self.model, cfg)

    loader = DataLoader(TensorDataset(torch.cat([batches(i) for i in range(4)])), batch_size=4)  # 4 batches

    def fit(epochs: int, ckpt_path=None) -> tuple[LM, L.Trainer]:
        lm = LM()
        trainer = L.Trainer(
            max_epochs=epochs, accumulate_grad_batches=cfg.accumulation_steps, gradient_clip_val=cfg.max_grad_norm,
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(lm, loader, ckpt_path=ckpt_path)
        return lm, trainer

    straight, trainer = fit(2)  # 2 optimizer steps per epoch
    assert trainer.global_step == 4 and isinstance(trainer.optimizers[0], MultiOptimizer)
    half, trainer = fit(1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, trainer = fit(2, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(half.model.blocks[0].attn.q.weight, resumed.model.blocks[0].attn.q.weight)
