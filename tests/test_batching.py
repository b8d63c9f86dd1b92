"""Batched decoding: generations decoded together give exactly the tokens each gives alone; the decoding step's
rows do not depend on each other; the sampler copes with any logits a model returns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lingmao.decoding import BatchDecoder, Generation, choose, decode, filter_probs
from lingmao.model import GPT, ModelConfig, _rows_times
from lingmao.sampling import sample_ids, sampling_rules

VOCAB, EOS, WINDOW = 60, 3, 24


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_len=64), VOCAB).eval()
    for block in model.blocks:  # zero-initialised projections would make every block the identity
        nn.init.normal_(block.attn.proj.weight, std=0.3)
        nn.init.normal_(block.mlp.proj.weight, std=0.3)
    return model


@pytest.mark.parametrize("shape", [(32, 96), (32, 60), (64, 32), (256, 768), (1024, 256), (256, 6256)])
def test_rows_of_a_product_do_not_depend_on_the_other_rows(shape):
    """The property of this machine's BLAS that batched decoding rests on (see lingmao.model.DecodeStep)."""
    torch.manual_seed(1)
    x, w = torch.randn(40, shape[0]), torch.randn(shape)
    alone = torch.cat([_rows_times(x[i : i + 1], w) for i in range(40)])
    for rows in (2, 3, 7, 16, 40):
        assert torch.equal(_rows_times(x[:rows], w), alone[:rows]), rows


def test_decode_step_rows_do_not_depend_on_the_other_rows(model):
    torch.manual_seed(2)
    rows, step = 5, model.decode_step()
    cache = model.new_cache(rows, WINDOW)
    for buffer in cache.keys + cache.values:  # each row its own history
        buffer.normal_()
    tokens, positions = torch.randint(0, VOCAB, (rows,)), torch.tensor([0, 3, 23, 11, 7])
    together = step(tokens, positions, cache)
    for i in range(rows):
        alone = model.new_cache(1, WINDOW)
        for a, b in zip(alone.keys + alone.values, cache.keys + cache.values, strict=True):
            a.copy_(b[i : i + 1])
        assert torch.equal(step(tokens[i : i + 1], positions[i : i + 1], alone), together[i : i + 1]), i


def test_exports_keep_q_k_v_apart_and_the_fused_step_decodes_them(model, tmp_path):
    """The decoding step fuses q, k and v when it is made; the model and its exports keep the three matrices, so
    exports written before load as they are, and the fused step gives the logits of the model's own forward."""
    from safetensors import safe_open

    from lingmao.data.tokenizer import train_tokenizer
    from lingmao.export import export_model, load_model

    tok = train_tokenizer(["春眠不觉晓，处处闻啼鸟。"] * 3)
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_len=64)
    source = GPT(cfg, tok.get_vocab_size()).eval()
    for block in source.blocks:
        nn.init.normal_(block.attn.proj.weight, std=0.3)
    directory = export_model(tmp_path / "export", source, tok, cfg)
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight"} <= keys
    loaded = load_model(directory).model
    tokens = torch.tensor([[2, 5, 7, 9, 4, 6]])
    with torch.inference_mode():
        cache = loaded.new_cache(1, 16)
        loaded(tokens[:, :3], cache=cache)
        step = loaded.decode_step()
        for t in range(3, tokens.size(1)):
            fused = step(tokens[:, t], torch.tensor([t]), cache)
            reference = source(tokens[:, : t + 1])[:, -1]
            assert torch.allclose(fused, reference, atol=1e-5), (fused - reference).abs().max()


class Alternating:
    """A rule with state of its own (like a verse form's): each sample alternates between even and odd tokens,
    starting with the parity of its first token."""

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        generated = tokens[:, start:]
        if generated.size(1) == 0:
            return scores
        parity = (generated[:, :1] + generated.size(1)) % 2
        allowed = (torch.arange(scores.size(1)) % 2).unsqueeze(0) == parity
        return scores.masked_fill(~allowed, float("-inf"))


def requests() -> list[dict]:
    """Generations that differ in every way: prompt, samples, length, sampling, rules, seed."""
    return [
        dict(prompt=[2, 10, 11], num_samples=1, max_new_tokens=40, temperature=1.0, seed=1),
        dict(prompt=[2, 5], num_samples=3, max_new_tokens=55, temperature=0.7, top_k=8, seed=2),
        dict(prompt=[2, *range(20, 40)], num_samples=2, max_new_tokens=30, temperature=1.3, top_p=0.8,
             repetition_penalty=1.5, seed=3),
        dict(prompt=[2, 7, 7, 7], num_samples=1, max_new_tokens=50, temperature=0.0, seed=4),
        dict(prompt=[2], num_samples=2, max_new_tokens=45, temperature=1.0, rules=[Alternating()], seed=5),
        dict(prompt=[2, 9], num_samples=1, max_new_tokens=35, temperature=0.9, eos=True, seed=6),
    ]


class Recorder:
    """A rule that keeps the scores it is given, to compare them bit for bit (sampled tokens would hide a
    difference in the last bits of a logit)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        self.seen.append(scores.clone())
        return scores


def generation(r: dict) -> Generation:
    return Generation(
        r["prompt"], eos_id=EOS, max_new_tokens=r["max_new_tokens"], num_samples=r["num_samples"],
        temperature=r["temperature"], top_k=r.get("top_k"), top_p=r.get("top_p", 1.0), seed=r["seed"],
        context_length=WINDOW,  # the windows fill and restart, each generation at its own steps
        rules=[Recorder()]
        + sampling_rules(VOCAB, r.get("repetition_penalty", 1.0), None, None if r.get("eos") else [EOS])
        + list(r.get("rules", [])),
    )


def scores_seen(g: Generation) -> list[torch.Tensor]:
    return g.rules[0].seen


def test_generations_decoded_together_are_what_they_are_alone(model, monkeypatch):
    alone_gens = [generation(r) for r in requests()]
    alone = [decode(model, g) for g in alone_gens]
    batch_rows: list[int] = []
    original = model.decode_step

    def counting_step():
        step = original()

        def counted(tokens, positions, cache):
            batch_rows.append(tokens.size(0))
            return step(tokens, positions, cache)

        return counted

    monkeypatch.setattr(model, "decode_step", counting_step)
    decoder = BatchDecoder(model, WINDOW)
    gens = [generation(r) for r in requests()]
    arrivals = {0: gens[:2], 3: gens[2:4], 10: gens[4:]}  # some arrive while others are decoding
    step = 0
    while step in arrivals or decoder.generations or any(s > step for s in arrivals):
        for g in arrivals.get(step, []):
            decoder.add(g)
        ended = decoder.step()
        assert all(g.error is None and g.stop_reason is None for g in ended)
        step += 1
    together = [g.rows() for g in gens]
    assert together == alone
    for a, b in zip(alone_gens, gens, strict=True):  # the very scores, not only the tokens sampled from them
        assert len(scores_seen(a)) == len(scores_seen(b))
        assert all(torch.equal(x, y) for x, y in zip(scores_seen(a), scores_seen(b), strict=True))
    assert max(batch_rows) == sum(r["num_samples"] for r in requests())  # all of them in one step at times
    assert len({len(row) for rows in together for row in rows}) > 3  # they ended at different lengths
    flat = [tuple(row) for rows in together for row in rows]
    assert len(set(flat)) == len(flat)  # and wrote different things


def test_the_comparison_can_fail(model):
    """Another seed or window changes the tokens: the equality above is not a matter of course."""
    r = requests()[0]
    base = decode(model, generation(r))
    assert decode(model, generation({**r, "seed": 99})) != base
    wide = generation(r)
    wide.context_length = 60
    assert decode(model, wide) != base


def test_one_generation_ending_early_leaves_the_others_alone(model):
    rs = requests()[:3]
    alone = [decode(model, generation(r)) for r in rs]
    decoder = BatchDecoder(model, WINDOW)
    gens = [generation(r) for r in rs]

    def boom(scores, tokens, start):
        if tokens.size(1) - start == 5:
            raise RuntimeError("a broken rule")
        return scores

    gens[1].rules.append(boom)
    for g in gens:
        decoder.add(g)
    steps = 0
    while decoder.generations:
        decoder.step()
        steps += 1
        if steps == 12:
            gens[2].cancel("cancelled")
    assert isinstance(gens[1].error, RuntimeError) and len(gens[1].rows()[0]) == 5
    assert gens[2].stop_reason == "cancelled" and all(len(row) == 12 for row in gens[2].rows())
    assert gens[2].rows() == [row[:12] for row in alone[2]]
    assert gens[0].rows() == alone[0]


def test_a_deadline_ends_a_generation_with_what_it_has(model):
    g = generation(requests()[0])
    g.deadline = 0.0  # long past
    decoder = BatchDecoder(model, WINDOW)
    decoder.add(g)
    assert decoder.step() == [g] and g.stop_reason == "time limit" and g.rows() == [[]]


class Returns(nn.Module):
    """A 'model' whose logits are whatever it is told (no KV cache: its context runs at every step)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.vocab_size, self.max_len = logits, logits.numel(), 64
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(idx.size(0), idx.size(1), -1)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("values", [
    [NAN] * VOCAB, [INF] * VOCAB, [-INF] * VOCAB, [3e38] * 30 + [-3e38] * 30, [NAN, INF, -INF, 1e38] * 15,
    [0.0] * 59 + [INF],
])
@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(temperature=0.01, repetition_penalty=0.1), dict(temperature=100.0, top_p=0.5),
    dict(temperature=0.0), dict(temperature=1.0, top_k=3, repetition_penalty=10.0),
])
def test_any_logits_give_allowed_tokens(values, options):
    odd = torch.arange(VOCAB) % 2 == 1

    def odd_only(step, generated):
        return odd.expand(generated.size(0), -1)

    model = Returns(torch.tensor(values))
    rows = sample_ids(model, [2, 5], eos_id=EOS, max_new_tokens=20, num_samples=3, banned=[EOS, 1], seed=0,
                      step_mask=odd_only, **options)
    assert all(len(row) == 20 and all(t % 2 == 1 and t not in (EOS, 1) for t in row) for row in rows), rows


def test_nan_logits_sample_evenly_among_the_allowed():
    model = Returns(torch.full((VOCAB,), NAN))
    rows = sample_ids(model, [2], eos_id=EOS, max_new_tokens=300, banned=[EOS], seed=0)
    counts = torch.bincount(torch.tensor(rows[0]), minlength=VOCAB)
    assert counts[EOS] == 0 and (counts > 0).sum() > VOCAB * 0.9


def test_choose_at_the_edges():
    scores = torch.tensor([[0.0, -INF, 5.0, -INF], [-INF] * 4, [1.0, 1.0, -INF, -INF]])
    ones = torch.ones(3)
    for u in (0.0, 0.5, 1 - 2**-53):  # the last: at the very top of the cumulative sum
        chosen = choose(scores, ones, None, None, torch.full((3,), u, dtype=torch.float64), torch.full((3,), 9))
        assert chosen[0] in (0, 2) and chosen[1] == 9 and chosen[2] in (0, 1)  # never a token of probability 0
    greedy = choose(scores, torch.zeros(3), None, None, torch.zeros(3, dtype=torch.float64), torch.full((3,), 9))
    assert greedy.tolist() == [2, 9, 0]


def test_filter_probs_per_row():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    out = filter_probs(probs, torch.tensor([0, 2, 0, 3]), torch.tensor([0.7, 1.0, 1.0, 0.8]))
    # top_p 0.7: 0.5 + 0.3 reach it; top_k 2; neither; top_k 3, then 0.8 of the 0.95 left: 0.5 + 0.3 reach it
    assert (out > 0).tolist() == [[True, True, False, False], [True, True, False, False], [True] * 4,
                                  [True, True, False, False]]
    assert torch.equal(out[out > 0], probs[out > 0])  # kept as they were
