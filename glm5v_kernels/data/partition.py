"""Balancing multimodal work over ranks and micro-batches (C++ host code, csrc/host/partition.cpp).

A VLM sample costs twice: its text in the LLM (a·L + L², causal) and its images in the ViT
(Σ t² + b·t over its images), and the two vary independently, so a partition balanced on one
can be far off on the other. `balanced_partition` balances any number of such keys at once: it
minimises, over the parts, the largest load on any key measured against that key's mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glm5v_kernels._backend import host_module

METHODS = ("kk", "lpt")


@dataclass(frozen=True)
class TransformerDims:
    """What sets a transformer's cost per token: hidden size, MLP size, attention heads."""

    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int | None = None
    gated_mlp: bool = True

    def params_per_layer(self) -> int:
        head_dim = self.hidden // self.num_heads
        kv = (self.num_kv_heads or self.num_heads) * head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv  # q, o, k, v
        return attention + (3 if self.gated_mlp else 2) * self.hidden * self.ffn


@dataclass(frozen=True)
class Partition:
    """parts[p]: the sample indices of part p, ascending; assignment[i]: the part of sample i;
    loads (k, m): each part's summed cost per key; imbalance (m,): max / mean load per key."""

    parts: list[list[int]]
    assignment: np.ndarray
    loads: np.ndarray
    imbalance: np.ndarray


def _as_costs(costs) -> np.ndarray:
    array = np.asarray(costs, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"costs must be (n,) or (n, keys) with n >= 1, got shape {np.shape(costs)}")
    if not np.isfinite(array).all():
        raise ValueError("costs must be finite (found NaN or inf)")
    if (array < 0).any():
        raise ValueError("costs must be >= 0")
    return np.ascontiguousarray(array)


def _as_key_vector(value, keys: int, name: str, positive: bool) -> np.ndarray | None:
    if value is None:
        return None
    array = np.ascontiguousarray(np.asarray(value, dtype=np.float64).reshape(-1))
    if array.shape != (keys,):
        raise ValueError(f"{name} must have one value per key ({keys}), got shape {np.shape(value)}")
    if np.isnan(array).any() or (array <= 0 if positive else array < 0).any():
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} (and not NaN), got {array.tolist()}")
    return array


def balanced_partition(costs, k: int, *, weights=None, caps=None, equal_size: bool = False, groups=None,
                       method: str = "kk") -> Partition:
    """Split samples into k parts balancing every cost key at once.

    costs: (n,) or (n, keys), >= 0 (e.g. columns from `vlm_sample_costs`). Minimised: the
    largest weights[j] · load[p, j] / mean_j over parts p and keys j. method "kk" starts from a
    Karmarkar–Karp largest-differencing partition generalised to cost vectors, "lpt" from the
    longest-processing-time greedy; both are then refined by moves and swaps. Problems of at most
    10 samples (or groups) are solved exactly. caps (keys,): hard limits on every part's load per
    key. equal_size: part sizes differ by at most one. groups (n,): samples sharing an id go to
    the same part. Deterministic: every rank computes the same answer.
    """
    costs = _as_costs(costs)
    n, keys = costs.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if equal_size and k > n:
        raise ValueError(f"equal_size needs at least one sample per part: k={k} > {n} samples")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    weights = _as_key_vector(weights, keys, "weights", positive=True)
    caps = _as_key_vector(caps, keys, "caps", positive=False)
    if caps is not None and (costs > caps).any():
        sample, key = map(int, np.argwhere(costs > caps)[0])
        raise ValueError(f"sample {sample} alone exceeds caps[{key}] ({costs[sample, key]} > {caps[key]})")
    if groups is not None:
        groups = np.ascontiguousarray(np.asarray(groups).astype(np.int64, casting="safe"))
        if groups.shape != (n,):
            raise ValueError(f"groups must have one id per sample ({n}), got shape {groups.shape}")
    assignment = host_module().balanced_partition(costs, int(k), weights, caps, bool(equal_size), groups, method)
    return _summarise(costs, assignment, int(k))


def _summarise(costs: np.ndarray, assignment: np.ndarray, k: int) -> Partition:
    loads = np.zeros((k, costs.shape[1]))
    np.add.at(loads, assignment, costs)
    mean = loads.mean(axis=0)
    imbalance = np.divide(loads.max(axis=0), mean, out=np.ones_like(mean), where=mean > 0)
    parts = [np.flatnonzero(assignment == p).tolist() for p in range(k)]
    return Partition(parts=parts, assignment=assignment, loads=loads, imbalance=imbalance)


def vlm_sample_costs(text_lens: Sequence[int], image_tokens: Sequence[Sequence[int]], *, llm_dims: TransformerDims,
                     vit_dims: TransformerDims) -> np.ndarray:
    """(n, 2) costs: column 0 the LLM, column 1 the ViT, each proportional to its FLOPs.

    A layer of width h with P parameters spends 2·P·L FLOPs in its matrices and 4·h·L² in
    attention (half of it with a causal mask). Divided by 2·h (LLM, causal) or 4·h (ViT, full):
    LLM a·L + L² with a = P_llm / h; ViT Σ over the sample's images of t² + b·t with
    b = P_vit / (2·h_vit), t the image's patch tokens.
    """
    lengths = np.asarray(text_lens, dtype=np.float64)
    if lengths.ndim != 1 or (lengths < 0).any() or not np.isfinite(lengths).all():
        raise ValueError("text_lens must be a 1-D sequence of non-negative lengths")
    if len(image_tokens) != len(lengths):
        raise ValueError(f"image_tokens must list the images of each of the {len(lengths)} samples, "
                         f"got {len(image_tokens)} entries")
    a = llm_dims.params_per_layer() / llm_dims.hidden
    b = vit_dims.params_per_layer() / (2 * vit_dims.hidden)
    vit = np.array([sum(float(t) ** 2 + b * float(t) for t in images) for images in image_tokens])
    if (vit < 0).any():
        raise ValueError("image_tokens must be non-negative")
    return np.stack([a * lengths + lengths**2, vit], axis=1)


def partition_frames(frame_tokens: Sequence[int], k: int, *, vit_dims: TransformerDims) -> list[tuple[int, int]]:
    """Contiguous (start, end) frame ranges of one long video over k ranks, minimising the largest
    range's ViT cost (t² + b·t per frame, as in `vlm_sample_costs`); exact up to float rounding.
    Ranges are empty only when there are fewer frames than ranks."""
    tokens = np.asarray(frame_tokens, dtype=np.float64)
    if tokens.ndim != 1 or tokens.size == 0 or (tokens < 0).any() or not np.isfinite(tokens).all():
        raise ValueError("frame_tokens must be a non-empty 1-D sequence of non-negative token counts")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    b = vit_dims.params_per_layer() / (2 * vit_dims.hidden)
    bounds = host_module().partition_contiguous(np.ascontiguousarray(tokens**2 + b * tokens), int(k))
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(k)]


def plan_microbatches(costs, tokens, max_tokens: int, *, weights=None, multiple_of: int = 1) -> list[list[int]]:
    """One rank's samples into the fewest micro-batches of at most max_tokens tokens each, with
    their costs balanced across the micro-batches. Returns the sample indices of each.

    multiple_of: the number of micro-batches is a multiple of it, none empty (e.g. the number of
    data-parallel ranks, which must all run as many micro-batches); needs that many samples."""
    costs = _as_costs(costs)
    tokens = _as_costs(tokens)
    if tokens.shape != (costs.shape[0], 1):
        raise ValueError(f"tokens must have one count per sample ({costs.shape[0]}), got shape {tokens.shape}")
    if not max_tokens >= tokens.max():
        raise ValueError(f"max_tokens ({max_tokens}) is below the longest sample ({int(tokens.max())} tokens)")
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1, got {multiple_of!r}")
    keys = costs.shape[1]
    weights = np.ones(keys) if weights is None else _as_key_vector(weights, keys, "weights", positive=True)
    combined = np.concatenate([costs, tokens], axis=1)
    # the token column only caps, it barely weighs in the balance
    all_weights = np.concatenate([weights, [1e-9]])
    caps = np.concatenate([np.full(keys, np.inf), [float(max_tokens)]])
    count = -(-max(1, int(np.ceil(tokens.sum() / max_tokens))) // multiple_of) * multiple_of
    while True:
        if multiple_of > 1 and count > costs.shape[0]:
            raise ValueError(f"{costs.shape[0]} samples cannot fill a multiple of {multiple_of} non-empty "
                             f"micro-batches of at most {max_tokens} tokens")
        # The balance may leave a part empty (one sample outweighing the rest); where parts must not
        # be empty, the same count is tried again with sizes that differ by at most one.
        for equal_size in (False, True) if multiple_of > 1 else (False,):
            try:
                partition = balanced_partition(combined, count, weights=all_weights, caps=caps, equal_size=equal_size)
            except ValueError:
                continue
            parts = [part for part in partition.parts if part]
            if len(parts) == count or multiple_of == 1:
                return parts
        count += multiple_of
