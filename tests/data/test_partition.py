"""Multi-key balanced partitioning (glm5v_kernels/data/partition.py, csrc/host/partition.cpp)
against exhaustive search, plain LPT, and its rules (caps, groups, equal sizes, determinism)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from glm5v_kernels.data import (
    TransformerDims,
    balanced_partition,
    partition_frames,
    plan_microbatches,
    vlm_sample_costs,
)


def objective(costs: np.ndarray, assignment, k: int, weights=None) -> float:
    """Largest weighted, mean-normalised load of any part on any key (what is minimised)."""
    costs = costs.reshape(len(costs), -1)
    loads = np.zeros((k, costs.shape[1]))
    np.add.at(loads, np.asarray(assignment), costs)
    mean = costs.sum(axis=0) / k
    w = np.ones(costs.shape[1]) if weights is None else np.asarray(weights)
    return float((w * np.divide(loads, mean, out=np.zeros_like(loads), where=mean > 0)).max())


def plain_lpt(costs: np.ndarray, k: int) -> np.ndarray:
    """Longest processing time first on mean-normalised cost vectors, no refinement."""
    normalised = costs / (costs.sum(axis=0) / k)
    loads = np.zeros((k, costs.shape[1]))
    assignment = np.zeros(len(costs), dtype=int)
    for i in sorted(range(len(costs)), key=lambda i: -normalised[i].max()):
        part = int(np.argmin((loads + normalised[i]).max(axis=1)))
        loads[part] += normalised[i]
        assignment[i] = part
    return assignment


@pytest.mark.parametrize("method", ["kk", "lpt"])
def test_optimal_on_small_instances(method):
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, k, keys = int(rng.integers(2, 9)), int(rng.integers(2, 4)), int(rng.integers(1, 3))
        costs = rng.random((n, keys)) * rng.choice([1.0, 10.0, 100.0], size=(n, keys))
        weights = rng.uniform(0.5, 2.0, keys)
        best = min(objective(costs, a, k, weights) for a in itertools.product(range(k), repeat=n))
        result = balanced_partition(costs, k, weights=weights, method=method)
        assert objective(costs, result.assignment, k, weights) <= best * (1 + 1e-9)


@pytest.mark.parametrize("keys", [1, 2])
def test_never_worse_than_plain_lpt(keys):
    rng = np.random.default_rng(keys)
    for n, k in [(500, 8), (3000, 64)]:
        lengths = rng.integers(50, 8000, (n, keys)).astype(float)
        costs = 4096 * lengths + lengths**2
        ours = balanced_partition(costs, k)
        assert objective(costs, ours.assignment, k) <= objective(costs, plain_lpt(costs, k), k) * (1 + 1e-12)
        assert ours.imbalance.max() < 1.01


def test_partition_summary_is_consistent():
    rng = np.random.default_rng(2)
    costs = rng.random((50, 2))
    result = balanced_partition(costs, 4)
    assert sorted(i for part in result.parts for i in part) == list(range(50))
    for p, part in enumerate(result.parts):
        assert np.all(result.assignment[part] == p)
        assert np.allclose(result.loads[p], costs[part].sum(axis=0))
    assert np.allclose(result.imbalance, result.loads.max(axis=0) / result.loads.mean(axis=0))


def test_caps_are_respected_and_infeasible_caps_fail():
    rng = np.random.default_rng(3)
    costs = rng.uniform(1, 10, (200, 2))
    caps = costs.sum(axis=0) / 8 * 1.05
    result = balanced_partition(costs, 8, caps=caps)
    assert np.all(result.loads <= caps * (1 + 1e-9))
    with pytest.raises(ValueError, match="caps"):
        balanced_partition(costs, 8, caps=costs.sum(axis=0) / 8 * 0.9)  # total exceeds k * caps


def test_groups_stay_together():
    rng = np.random.default_rng(4)
    costs = rng.random((120, 2))
    groups = rng.integers(0, 30, 120)
    result = balanced_partition(costs, 5, groups=groups)
    for g in np.unique(groups):
        assert len(set(result.assignment[groups == g].tolist())) == 1


@pytest.mark.parametrize("n,k", [(100, 7), (64, 64), (1000, 64)])
def test_equal_size(n, k):
    costs = np.random.default_rng(5).random((n, 2))
    sizes = [len(part) for part in balanced_partition(costs, k, equal_size=True).parts]
    assert max(sizes) - min(sizes) <= 1


def test_deterministic():
    costs = np.random.default_rng(6).random((2000, 2))
    first = balanced_partition(costs, 16)
    assert np.array_equal(first.assignment, balanced_partition(costs.copy(), 16).assignment)


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(costs=[[1.0, -1.0]], k=1), ">= 0", id="negative"),
    pytest.param(dict(costs=[[1.0, np.nan]], k=1), "finite", id="nan"),
    pytest.param(dict(costs=[1.0, 2.0], k=0), "k must be", id="k-0"),
    pytest.param(dict(costs=[1.0, 2.0], k=3, equal_size=True), "equal_size", id="equal-size-k-above-n"),
    pytest.param(dict(costs=[[1.0, 2.0]], k=1, weights=[1.0]), "weights", id="weights-shape"),
    pytest.param(dict(costs=[[1.0, 2.0]], k=1, weights=[1.0, 0.0]), "weights", id="weight-zero"),
    pytest.param(dict(costs=[5.0, 1.0], k=2, caps=[4.0]), "sample 0 alone exceeds", id="sample-over-cap"),
    pytest.param(dict(costs=[1.0, 2.0], k=2, groups=[0]), "groups", id="groups-shape"),
    pytest.param(dict(costs=[1.0, 2.0], k=2, method="greedy"), "method", id="unknown-method"),
    pytest.param(dict(costs=np.zeros((0, 2)), k=2), "n >= 1", id="empty"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        balanced_partition(**kwargs)


LLM = TransformerDims(hidden=2048, ffn=8192, num_heads=16, num_kv_heads=4)
VIT = TransformerDims(hidden=1024, ffn=4096, num_heads=16)


def test_vlm_sample_costs_formula():
    costs = vlm_sample_costs([100, 0], [[64, 256], []], llm_dims=LLM, vit_dims=VIT)
    a = LLM.params_per_layer() / 2048  # = (2·2048² + 2·2048·512 + 3·2048·8192) / 2048
    assert a == 2 * 2048 + 2 * 512 + 3 * 8192
    b = VIT.params_per_layer() / (2 * 1024)
    assert np.allclose(costs, [[a * 100 + 100**2, 64**2 + b * 64 + 256**2 + b * 256], [0.0, 0.0]])
    with pytest.raises(ValueError, match="image_tokens"):
        vlm_sample_costs([1, 2], [[3]], llm_dims=LLM, vit_dims=VIT)


def test_partition_frames_is_optimal():
    rng = np.random.default_rng(7)
    b = VIT.params_per_layer() / (2 * VIT.hidden)
    for _ in range(30):
        frames = rng.integers(16, 1024, int(rng.integers(1, 9)))
        k = int(rng.integers(1, 5))
        cost = frames.astype(float) ** 2 + b * frames
        ranges = partition_frames(frames, k, vit_dims=VIT)
        assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == len(frames)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(k - 1))
        ours = max(cost[s:e].sum() for s, e in ranges)
        best = min(max(cost[s:e].sum() for s, e in zip((0, *cuts), (*cuts, len(frames))))
                   for cuts in itertools.combinations_with_replacement(range(len(frames) + 1), k - 1))
        assert ours <= best * (1 + 1e-9)
        if len(frames) >= k:
            assert all(e > s for s, e in ranges), "no empty range while there are frames to give"


def test_plan_microbatches():
    rng = np.random.default_rng(8)
    tokens = rng.integers(100, 2000, 300)
    costs = np.stack([tokens * 4096.0 + tokens**2.0, rng.random(300)], axis=1)
    batches = plan_microbatches(costs, tokens, max_tokens=16384)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert all(tokens[batch].sum() <= 16384 for batch in batches)
    assert len(batches) <= int(np.ceil(tokens.sum() / 16384)) + 1
    with pytest.raises(ValueError, match="max_tokens"):
        plan_microbatches(costs, tokens, max_tokens=1000)


@pytest.mark.parametrize("multiple_of", [2, 3])
def test_plan_microbatches_multiple_of(multiple_of):
    """A count that is a multiple of the ranks, no part empty, caps kept, even when one sample
    outweighs the others."""
    rng = np.random.default_rng(multiple_of)
    tokens = rng.integers(10, 100, 13)
    costs = np.stack([tokens * 64.0 + tokens**2.0, rng.random(13)], axis=1)
    costs[0] *= 1000
    batches = plan_microbatches(costs, tokens, max_tokens=300, multiple_of=multiple_of)
    assert len(batches) % multiple_of == 0 and all(batches)
    assert len(batches) - multiple_of < max(1, int(np.ceil(tokens.sum() / 300)))
    assert sorted(i for batch in batches for i in batch) == list(range(13))
    assert all(tokens[batch].sum() <= 300 for batch in batches)
    with pytest.raises(ValueError, match="multiple of 14"):
        plan_microbatches(costs, tokens, max_tokens=300, multiple_of=14)
