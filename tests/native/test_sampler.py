"""The sampler: each filter on hand-made distributions, penalty arithmetic, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tabmesh.sampler import Sampler, SamplingParams, candidates, draw, softmax

# probabilities 0.5, 0.3, 0.15, 0.05 for tokens 3, 1, 0, 2 (ids shuffled so order matters)
PROBS = {3: 0.5, 1: 0.3, 0: 0.15, 2: 0.05}
LOGITS = np.log(np.array([PROBS[i] for i in range(4)], np.float32))


def dist(params: SamplingParams, logits=LOGITS, **kw) -> dict[int, float]:
    ids, probs = Sampler(params, seed=0, **kw).distribution(logits)
    return {int(i): float(p) for i, p in zip(ids, probs)}


def test_no_filter_is_the_softmax_in_order():
    d = dist(SamplingParams())
    assert list(d) == [3, 1, 0, 2]
    assert d == pytest.approx(PROBS)


@pytest.mark.parametrize("k, kept", [(1, [3]), (2, [3, 1]), (3, [3, 1, 0]), (4, [3, 1, 0, 2]), (0, [3, 1, 0, 2]),
                                     (100, [3, 1, 0, 2])])
def test_top_k_keeps_the_k_most_likely(k, kept):
    d = dist(SamplingParams(top_k=k))
    assert list(d) == kept
    assert sum(d.values()) == pytest.approx(1)


@pytest.mark.parametrize("top_p, kept", [(0.0, [3]), (0.5, [3]), (0.51, [3, 1]), (0.8, [3, 1]),
                                         (0.81, [3, 1, 0]), (0.99, [3, 1, 0, 2]), (1.0, [3, 1, 0, 2])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    d = dist(SamplingParams(top_p=top_p))
    assert list(d) == kept
    total = sum(PROBS[i] for i in kept)
    assert d == pytest.approx({i: PROBS[i] / total for i in kept})


@pytest.mark.parametrize("min_p, kept", [(0.0, [3, 1, 0, 2]), (0.09, [3, 1, 0, 2]), (0.2, [3, 1, 0]),
                                         (0.5, [3, 1]), (0.61, [3]), (1.0, [3])])
def test_min_p_keeps_tokens_at_least_min_p_times_the_best(min_p, kept):
    assert list(dist(SamplingParams(min_p=min_p))) == kept


def test_temperature_reshapes_after_the_filters():
    z = LOGITS.astype(np.float64)
    for t in (0.5, 1.0, 2.0):
        d = dist(SamplingParams(temperature=t))
        want = softmax(z / t)
        assert d == pytest.approx({i: want[i] for i in range(4)})
    # top_p is judged on the temperature-1 distribution: a hot temperature keeps the same set
    assert list(dist(SamplingParams(top_p=0.8, temperature=2.0))) == [3, 1]
    flat = dist(SamplingParams(top_p=0.8, temperature=2.0))
    assert flat[3] / flat[1] == pytest.approx(math.sqrt(0.5 / 0.3))


def test_filters_chain_in_llama_cpp_order():
    # top_k=3 drops token 2; top_p=0.9 over the renormalised {0.5, 0.3, 0.15}/0.95 keeps 3 tokens
    # (0.526, 0.842, 1.0); min_p=0.35 then drops token 0 (0.15 < 0.35 * 0.5)
    assert list(dist(SamplingParams(top_k=3, top_p=0.9))) == [3, 1, 0]
    assert list(dist(SamplingParams(top_k=3, top_p=0.9, min_p=0.35))) == [3, 1]


def test_ties_are_ordered_by_id():
    ids, _ = candidates(np.zeros(5), SamplingParams(top_k=3))
    assert list(ids) == [0, 1, 2]


def test_greedy_takes_the_argmax_lowest_id_on_ties_and_needs_no_logits():
    x = np.array([1.0, 5.0, 5.0, -2.0], np.float32)
    s = Sampler(SamplingParams(temperature=0))
    assert s.sample(x) == 1
    assert not s.needs_logits
    assert Sampler(SamplingParams(temperature=0.7, top_k=1)).sample(x) == 1
    for p in (SamplingParams(temperature=0, frequency_penalty=0.5), SamplingParams(temperature=0, logit_bias={0: 5}),
              SamplingParams(temperature=0, repetition_penalty=1.1), SamplingParams(temperature=0.5)):
        assert Sampler(p).needs_logits, p


def test_the_same_seed_reproduces_exactly_and_another_differs():
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=50).astype(np.float32) for _ in range(200)]
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=20)

    def run(seed):
        s = Sampler(p, seed=seed)
        return [s.sample(x) for x in logits]

    a = run(1234)
    assert a == run(1234)
    assert a != run(1235)
    assert run(-1) == run(2**64 - 1)  # negative seeds wrap to 64 bits
    assert Sampler(p).seed != Sampler(p).seed  # no seed: a fresh random one, kept for reproduction


def test_sampling_frequencies_follow_the_distribution():
    s = Sampler(SamplingParams(), seed=7)
    counts = np.bincount([s.sample(LOGITS) for _ in range(4000)], minlength=4) / 4000
    assert counts == pytest.approx([PROBS[i] for i in range(4)], abs=0.03)


def test_draw_is_the_inverse_cdf():
    p = np.array([0.5, 0.3, 0.2])
    assert [draw(p, u) for u in (0.0, 0.49, 0.5, 0.79, 0.8, 0.999999)] == [0, 0, 1, 1, 2, 2]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    x = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0), prompt_tokens=[0, 1, 0])
    assert s.adjust(x) == pytest.approx([1.0, -4.0, 1.0, 0.5])  # counted once however often it appears


def test_repetition_penalty_window_is_the_last_n_of_prompt_and_generated():
    x = np.ones(6, np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0, repeat_last_n=3), prompt_tokens=[0, 1, 2])
    s.accept(3)                                           # window is now 1, 2, 3
    assert s.adjust(x) == pytest.approx([1, 0.5, 0.5, 0.5, 1, 1])
    s_all = Sampler(SamplingParams(repetition_penalty=2.0, repeat_last_n=-1), prompt_tokens=[0, 1, 2])
    s_all.accept(3)
    assert s_all.adjust(x) == pytest.approx([0.5, 0.5, 0.5, 0.5, 1, 1])
    off = Sampler(SamplingParams(repetition_penalty=2.0, repeat_last_n=0), prompt_tokens=[0])
    assert off.adjust(x) == pytest.approx(x) and not off.params.has_penalties


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    x = np.zeros(4, np.float32)
    s = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt_tokens=[2, 2, 2])
    for t in (0, 0, 0, 1):
        s.accept(t)
    # OpenAI: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
    assert s.adjust(x) == pytest.approx([-1.75, -0.75, 0.0, 0.0])


def test_logit_bias_bans_and_forces():
    s = Sampler(SamplingParams(temperature=0, logit_bias={3: -100, 2: 10}))
    assert s.sample(LOGITS) == 2
    d = dist(SamplingParams(logit_bias={3: -100}))
    assert d[3] < 1e-40 and list(d)[0] == 1


def test_a_constraint_masks_before_the_filters():
    class OnlyEven:
        def __init__(self):
            self.accepted: list[int] = []

        def mask(self, logits, limit):
            out = np.full_like(logits, -np.inf)
            out[::2] = logits[::2]
            return out

        def accept(self, t):
            self.accepted.append(t)

    c = OnlyEven()
    s = Sampler(SamplingParams(temperature=0), constraint=c)
    assert s.needs_logits and s.sample(LOGITS) == 0       # best even token
    d = dist(SamplingParams(top_k=1), constraint=OnlyEven())
    assert list(d) == [0]
    s.accept(0)
    assert c.accepted == [0]


def test_all_masked_is_an_error_not_a_silent_token():
    s = Sampler(SamplingParams(temperature=0, logit_bias={0: -math.inf}))
    with pytest.raises(ValueError, match="-inf"):
        s.sample(np.array([0.0], np.float32))


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2),
                                dict(repetition_penalty=0), dict(repeat_last_n=-2)])
def test_bad_params_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
