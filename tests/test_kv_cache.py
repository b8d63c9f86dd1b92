"""Sampling with the KV cache gives the same text as sampling without it."""

import re

import pytest
import torch
from torch import nn

from lingmao.decoding import context_start
from lingmao.model import GPT, DecodeStep, ModelConfig, SimpleTransformer
from lingmao.sampling import sample_ids

VOCAB, EOS = 60, 3
PROMPT = [2, 10, 11, 12, 13]


def fresh_model(seed: int = 3, max_len: int = 64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_len=max_len), VOCAB)
    for block in model.blocks:  # zero-initialised projections would make every block the identity
        nn.init.normal_(block.attn.proj.weight, std=0.3)
        nn.init.normal_(block.mlp.proj.weight, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return fresh_model(seed=0, max_len=256)


def both(model: nn.Module, **kw) -> tuple[list[list[int]], list[list[int]]]:
    args = dict(eos_id=EOS, banned=[EOS], seed=7, context_length=128)
    args.update(kw)
    return sample_ids(model, PROMPT, use_cache=True, **args), sample_ids(model, PROMPT, use_cache=False, **args)


def test_context_start_keeps_the_last_half_when_the_window_is_full():
    starts, start = [], 0
    for length in range(1, 31):
        start = context_start(length, start, 8)
        starts.append(start)
    # Grows to 8 tokens; the 9th moves the start to keep the last 4; again at 13 - ... and so on.
    assert starts[:8] == [0] * 8
    assert starts[8:13] == [5] * 5  # lengths 9..13 (13 - 5 = 8 tokens)
    assert starts[13:18] == [10] * 5  # lengths 14..18
    assert all(0 < length - s <= 8 for length, s in zip(range(1, 31), starts, strict=True))
    assert context_start(10, 0, 1) == 9  # a window of one token keeps one


@pytest.mark.parametrize("new_tokens", [200, 60])  # past the window of 128, and within it
def test_same_text_with_and_without_cache(model, new_tokens):
    cached, plain = both(model, max_new_tokens=new_tokens, num_samples=3)
    assert cached == plain
    assert all(len(row) == new_tokens for row in cached)
    assert len({tuple(row) for row in cached}) == 3  # the samples differ from each other


def test_same_text_with_filters_penalty_and_greedy(model):
    for kw in (dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3), dict(temperature=0.0)):
        cached, plain = both(model, max_new_tokens=80, num_samples=2, context_length=32, **kw)
        assert cached == plain


def test_same_text_with_a_step_mask_and_the_same_stream(model):
    seen: dict[bool, list] = {True: [], False: []}

    def run(use_cache: bool) -> list[list[int]]:
        def step_mask(step: int, generated: torch.Tensor) -> torch.Tensor:
            assert generated.shape == (2, step)
            allowed = torch.zeros(2, VOCAB, dtype=torch.bool)
            allowed[:, 4 + (step % 5) :: 5] = True  # tokens of one residue class per step
            allowed[1, :] |= step >= 180  # the second sample is free at the end
            return allowed

        return sample_ids(
            model, PROMPT, eos_id=EOS, banned=[EOS], max_new_tokens=200, num_samples=2, seed=3,
            context_length=128, step_mask=step_mask, use_cache=use_cache,
            on_step=lambda tokens, active: seen[use_cache].append(tokens.tolist()),
        )

    cached, plain = run(True), run(False)
    assert cached == plain
    assert seen[True] == seen[False] and len(seen[True]) == 200
    assert all((t - 4) % 5 == step % 5 for row in cached for step, t in enumerate(row[:180]))


def test_the_cache_is_used_and_refilled_by_the_shared_rule(model, monkeypatch):
    prefills: list[tuple[int, int]] = []  # (step, tokens) of each run of the whole context through the model
    steps: list[tuple[int, list[int]]] = []  # (step, positions) of each one-token decoding step
    calls = 0

    def count_prefill(module, args, kwargs):
        nonlocal calls
        prefills.append((calls, args[0].size(1)))
        calls += 1

    def counting_decode_step(original=model.decode_step):
        step = original()

        def counted(tokens, positions, cache):
            nonlocal calls
            steps.append((calls, positions.tolist()))
            calls += 1
            return step(tokens, positions, cache)

        return counted

    monkeypatch.setattr(model, "decode_step", counting_decode_step)
    hook = model.register_forward_pre_hook(count_prefill, with_kwargs=True)
    try:
        sample_ids(model, PROMPT, eos_id=EOS, banned=[EOS], max_new_tokens=200, seed=1, context_length=128)
    finally:
        hook.remove()
    # The prompt at once, then one token per step; at 129 tokens the last 64 again, which grow to 128 ...
    refills = [step for step, _ in prefills]
    assert prefills[0] == (0, len(PROMPT)) and refills == [0, 129 - len(PROMPT), 129 - len(PROMPT) + 65]
    assert all(n == 64 for _, n in prefills[1:])
    assert calls == 200 and len(steps) == 200 - len(prefills)
    # Between refills each step writes the next position of the cache.
    for call, [position] in steps:
        fill, length = max((i, n) for i, n in prefills if i < call)
        assert position == length + (call - fill - 1), (call, position)


def test_the_context_matters(model):
    """Otherwise the comparisons above could not fail: a shorter window samples other text."""
    cached, _ = both(model, max_new_tokens=60, num_samples=1)
    short, _ = both(model, max_new_tokens=60, num_samples=1, context_length=2)
    assert cached != short


def step_logits(step, model: GPT) -> torch.Tensor:
    cache = model.new_cache(2, 16)
    return step(torch.tensor([5, 9]), torch.tensor([0, 0]), cache)


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "in-place write", "training mode", "to"])
def test_the_decoding_step_is_kept_until_a_weight_changes(change):
    """`GPT.decode_step` copies every matrix; it gives the same step again while nothing changed, and a step with
    the new weights after any change (a kept step with the old weights would decode with a stale model)."""
    model = fresh_model()
    kept = model.decode_step()
    assert model.decode_step() is kept
    with torch.no_grad():
        before = step_logits(kept, model)
    if change == "optimizer step":  # in evaluation mode, so that only the step itself tells
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.tensor([[5, 6, 7]])).sum().backward()
        optimizer.step()
    elif change == "load_state_dict":
        other = fresh_model()
        with torch.no_grad():
            other.head.weight.mul_(2.0)
        model.load_state_dict(other.state_dict())
    elif change == "in-place write":
        with torch.no_grad():
            model.blocks[1].mlp.fc.weight.add_(0.5)
    elif change == "training mode":
        model.train().eval()
    else:
        model.to(torch.float64).to(torch.float32)
    step = model.decode_step()
    assert step is not kept
    assert model.decode_step() is step
    with torch.no_grad():
        after, rebuilt = step_logits(step, model), step_logits(DecodeStep(model), model)
    assert torch.equal(after, rebuilt)
    if change != "training mode" and change != "to":
        assert not torch.equal(after, before)


def test_a_kept_step_is_not_carried_by_copies_pickles_or_conversions(tmp_path):
    """It holds a copy of every matrix: a saved or copied model must not carry it, and after `.to()` it would hold
    the memory of the tensors before."""
    import copy

    model = fresh_model()
    torch.save(model, tmp_path / "without.pt")
    kept = model.decode_step()
    torch.save(model, tmp_path / "with.pt")
    sizes = [(tmp_path / name).stat().st_size for name in ("with.pt", "without.pt")]
    assert sizes[0] < 1.05 * sizes[1], sizes  # the step's copies would nearly double it
    assert model.decode_step() is kept  # saving let nothing go
    assert copy.deepcopy(model)._decode_step is None
    model.to(torch.float32)
    assert model._decode_step is None


def test_a_model_made_in_inference_mode_gets_a_new_step_each_time():
    """Its tensors keep no version counter, so a change could not be seen: nothing is kept."""
    with torch.inference_mode():
        model = fresh_model()
        assert model.decode_step() is not model.decode_step()


def test_a_model_without_cache_samples_past_its_window():
    torch.manual_seed(0)
    design = SimpleTransformer(ModelConfig(arch="design", d_model=16, nhead=2, num_layers=1, dim_feedforward=32,
                                           max_len=32), VOCAB).eval()
    rows = sample_ids(design, PROMPT, eos_id=EOS, banned=[EOS], max_new_tokens=80, num_samples=2, seed=0)
    assert [len(r) for r in rows] == [80, 80]


def test_bench_generate_prints_every_path(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "tiny", "--window", "16", "--new-tokens", "30", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    for path in ("no cache", "KV cache, module forward", "decode step, q k v apart", "decode step"):
        assert re.search(rf"^{path} +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+x +yes$", out, re.M), out
    assert "same tokens on every path: yes" in out
