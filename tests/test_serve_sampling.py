"""Sampling on the device (mkcompiler/serve/sampling.py): top-k and top-p never pick outside
their candidates, draws follow the renormalised probabilities, temperature 0 is greedy, and a
draw depends only on (seed, step), not on the rest of the batch."""

import torch

from mkcompiler.serve.sampling import SamplingRows, candidate_mask, sample, uniform_noise

V = 50


def rows(n, temperature=1.0, top_k=V, top_p=1.0, seed0=0, step=0):
    return SamplingRows(
        torch.full((n,), float(temperature)),
        torch.full((n,), top_k, dtype=torch.int64),
        torch.full((n,), float(top_p)),
        torch.arange(seed0, seed0 + n, dtype=torch.int64),
        torch.full((n,), step, dtype=torch.int64),
    )


def random_logits(seed, n=1):
    return (torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 2).expand(n, V).contiguous()


def test_temperature_zero_is_greedy():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, rows(64, temperature=0.0)), logits.argmax(-1))
    mixed = rows(64, temperature=1.0)
    mixed.temperature[::2] = 0.0
    got = sample(logits, mixed)
    assert torch.equal(got[::2], logits[::2].argmax(-1))
    assert not torch.equal(got[1::2], logits[1::2].argmax(-1))  # sampled rows differ somewhere


def test_top_k_never_picks_outside_the_k_most_likely():
    n = 4000
    logits = random_logits(2, n)
    for k in (1, 3, 10):
        got = sample(logits, rows(n, top_k=k, seed0=17 * k))
        allowed = set(logits[0].topk(k).indices.tolist())
        assert set(got.tolist()) <= allowed
        assert len(set(got.tolist())) == k  # and reaches every candidate (n draws)


def test_top_p_never_picks_outside_the_nucleus():
    n = 4000
    logits = random_logits(3, n)
    probs, order = logits[0].softmax(-1).sort(descending=True)
    for p in (0.3, 0.7, 0.95):
        size = int((probs.cumsum(0) - probs < p).sum())  # the smallest prefix reaching p
        got = sample(logits, rows(n, top_p=p, seed0=int(p * 1000)))
        assert set(got.tolist()) <= set(order[:size].tolist())
        assert set(got.tolist()) == set(order[:size].tolist()) or size > 20


def test_draws_follow_the_renormalised_probabilities():
    """Temperature 0.7 and top-k 5: frequencies of 20000 draws within 4 standard errors of the
    renormalised softmax(logits / 0.7) over the 5 candidates."""
    n = 20000
    logits = random_logits(4, n)
    got = sample(logits, rows(n, temperature=0.7, top_k=5, seed0=99))
    top = (logits[0] / 0.7).topk(5)
    want = top.values.softmax(-1)
    freq = torch.stack([(got == t).float().mean() for t in top.indices])
    stderr = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 4 * stderr + 1e-3).all(), (freq, want)


def test_a_draw_depends_only_on_its_seed_and_step():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(5))
    r = rows(8, seed0=1000, step=3)
    alone = torch.stack([sample(logits[i : i + 1], SamplingRows(*(t[i : i + 1] for t in r))) for i in range(8)])
    assert torch.equal(sample(logits, r), alone[:, 0])
    other_step = sample(logits, rows(8, seed0=1000, step=4))
    assert not torch.equal(sample(logits, r), other_step)


def test_noise_is_uniform_in_the_open_interval():
    u = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 1000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_candidate_mask_keeps_the_most_likely_token_always():
    probs = torch.tensor([[0.9, 0.05, 0.05]])
    assert candidate_mask(probs, torch.tensor([3]), torch.tensor([0.01])).tolist() == [[True, False, False]]
    assert candidate_mask(probs, torch.tensor([3]), torch.tensor([0.92])).tolist() == [[True, True, False]]


def test_rows_named_as_drawn_are_drawn_the_same_and_the_rest_are_argmax():
    """sample(..., drawn): the engine names the rows with a temperature above 0; those draw the
    tokens they draw without the list, the others are the argmax (no sort for a greedy step)."""
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(6))
    mixed = rows(16, temperature=0.8, top_k=10, top_p=0.9, seed0=40, step=2)
    mixed.temperature[::3] = 0.0
    drawn = [r for r in range(16) if r % 3]
    want = sample(logits, mixed)
    got = sample(logits, mixed, drawn)
    assert torch.equal(got, want)
    assert not torch.equal(got[drawn], logits[drawn].argmax(-1))  # the drawn rows did draw
    assert torch.equal(sample(logits, rows(16, temperature=0.0), []), logits.argmax(-1))
