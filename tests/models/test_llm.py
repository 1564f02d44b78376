"""DecoderLM (glm5v/models/llm.py): transformers' GlmModel run in float64 per document, packing
against a per-document loop, causality and isolation of documents, rotary positions, the fused
loss against full logits, tied weights, MMTPHead on top, the Triton kernels under the
interpreter against the CPU path, the ~1B preset on the meta device, errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from glm5v.data.tokenizer import IMAGE, ByteTokenizer
from glm5v.models.llm import IGNORE_INDEX, DecoderLM, DecoderLMConfig, document_positions, llm_1b, llm_tiny
from glm5v_kernels import varlen_plan
from glm5v_kernels._backend import use_backend
from glm5v_kernels.nn import MMTPHead
from glm5v_kernels.testing import assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_BACKEND = "triton" if ON_GPU else "interpret"
# The kernel path's fp32 dots may run as tf32 on a GPU.
TOL = 5e-4 if ON_GPU else 2e-5
BOUNDS = [0, 1, 14, 21, 38]  # documents of 1, 13, 7 and 17 tokens


def perturbed(config: DecoderLMConfig) -> DecoderLM:
    """A model whose norm gains and biases are random too, so a swapped norm or bias would show."""
    model = DecoderLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "bias" not in name else 0.1 * torch.randn_like(p))
    return model


def packed_inputs(vocab: int, bounds=BOUNDS):
    ids = torch.randint(0, vocab, (bounds[-1],))
    return ids, torch.tensor(bounds, dtype=torch.int32)


def next_token_labels(ids: torch.Tensor, bounds) -> torch.Tensor:
    """labels[t] = ids[t + 1] inside each document, ignored on each document's last token."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    for s, e in zip(bounds[:-1], bounds[1:]):
        labels[s:e - 1] = ids[s + 1:e]
    return labels


def test_document_positions_restart_per_document():
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    expected = torch.cat([torch.arange(e - s) for s, e in zip(BOUNDS[:-1], BOUNDS[1:])])
    assert torch.equal(document_positions(cu, BOUNDS[-1]), expected)


def test_matches_transformers_glm_per_document():
    """GLM's own layout (partial interleaved rotary, q/k/v biases, no QK-norm, untied head)
    against transformers' GlmModel in float64, each document run alone there."""
    transformers = pytest.importorskip("transformers")
    config = llm_tiny(qk_norm=False, vocab_size=96)
    model = perturbed(config).eval()
    ref = transformers.GlmModel(transformers.GlmConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        pad_token_id=0, attention_bias=True)).double().eval()
    state = {"embed_tokens.weight": model.embed_tokens.weight, "norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        sizes = [config.num_heads * config.head_dim] + 2 * [config.num_kv_heads * config.head_dim]
        for name, w, b in zip("qkv", attn.qkv.weight.split(sizes), attn.qkv.bias.split(sizes)):
            state[f"layers.{i}.self_attn.{name}_proj.weight"] = w
            state[f"layers.{i}.self_attn.{name}_proj.bias"] = b
        state[f"layers.{i}.self_attn.o_proj.weight"] = attn.o_proj.weight
        state[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
        state[f"layers.{i}.mlp.down_proj.weight"] = layer.mlp.down_proj.weight
        state[f"layers.{i}.input_layernorm.weight"] = layer.input_layernorm.weight
        state[f"layers.{i}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    ref.load_state_dict({k: v.detach().double() for k, v in state.items()}, strict=True)

    ids, cu = packed_inputs(config.vocab_size)
    with torch.no_grad():
        out = model(ids, cu)
        expected = torch.cat([ref(input_ids=ids[None, s:e]).last_hidden_state[0]
                              for s, e in zip(BOUNDS[:-1], BOUNDS[1:])])
    assert_close(out.hidden, expected, dtype=torch.float32, name="hidden")
    # the comparison can fail: rotate-half pairs instead of GLM's interleaved ones differ
    other = DecoderLM(dataclasses.replace(config, rotary_interleaved=False))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(ids, cu).hidden - expected).norm() > 1e-3 * expected.norm()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_packed_equals_each_document_alone(tie):
    config = llm_tiny(tie_embeddings=tie, rot_dim=12)
    model = perturbed(config)
    ids, cu = packed_inputs(config.vocab_size)
    labels = next_token_labels(ids, BOUNDS)
    out = model(ids, cu)
    loss = model.loss(out.hidden, labels, reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))

    hidden, loss_loop = [], 0.0
    for s, e in zip(BOUNDS[:-1], BOUNDS[1:]):
        alone = model(ids[s:e], torch.tensor([0, e - s], dtype=torch.int32)).hidden
        hidden.append(alone)
        loss_loop = loss_loop + model.loss(alone, labels[s:e], reduction="sum")
    grads_loop = torch.autograd.grad(loss_loop, list(model.parameters()))
    assert_close(out.hidden, torch.cat(hidden), name="hidden")
    assert_close(loss, loss_loop, name="loss")
    for (name, _), g, g_loop in zip(model.named_parameters(), grads, grads_loop):
        assert_close(g, g_loop, name=f"d{name}")


def test_causal_and_documents_isolated():
    config = llm_tiny()
    model = perturbed(config).eval()
    ids, cu = packed_inputs(config.vocab_size)
    with torch.no_grad():
        base = model(ids, cu).hidden
        t = 17  # inside the document [14, 21)
        changed = ids.clone()
        changed[t] = (ids[t] + 1) % config.vocab_size
        after = model(changed, cu).hidden
    assert torch.equal(after[:t], base[:t]), "an earlier token saw a later one, or a document saw another"
    assert torch.equal(after[21:], base[21:]), "a later document saw an earlier one"
    assert not torch.allclose(after[t:21], base[t:21]), "the change did not reach its own document"


def test_rotary_positions_are_relative_and_used():
    """Shifting a document's positions by a constant leaves attention unchanged (rotary is
    relative), so positions counted over the whole pack give the default output; shuffled
    positions do not."""
    config = llm_tiny()
    model = perturbed(config).eval()
    ids, cu = packed_inputs(config.vocab_size)
    total = BOUNDS[-1]
    with torch.no_grad():
        base = model(ids, cu).hidden
        assert_close(model(ids, cu, position_ids=torch.arange(total) + 5).hidden, base, name="shifted")
        shuffled = model(ids, cu, position_ids=torch.randperm(total)).hidden
    assert (shuffled - base).norm() > 1e-3 * base.norm()


def test_inputs_embeds_and_plan_give_the_same_output():
    config = llm_tiny()
    model = perturbed(config).eval()
    ids, cu = packed_inputs(config.vocab_size)
    with torch.no_grad():
        base = model(ids, cu, max_seqlen=17).hidden
        from_embeds = model(inputs_embeds=model.embed_tokens(ids), plan=varlen_plan(cu)).hidden
    assert torch.equal(from_embeds, base)


def test_loss_and_logits_match_full_cross_entropy_and_gradients_flow():
    config = llm_tiny()
    model = perturbed(config)
    ids, cu = packed_inputs(config.vocab_size)
    labels = next_token_labels(ids, BOUNDS)
    out = model(ids, cu)
    loss = model.loss(out.hidden, labels)
    expected = F.cross_entropy(model.logits(out.hidden).double(), labels, ignore_index=IGNORE_INDEX)
    assert_close(loss, expected, name="loss")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_tied_head_is_the_embedding():
    """Tied: one (V, C) parameter, whose gradient is the sum of the embedding's and the head's
    gradients in an untied copy holding the same values."""
    tied = perturbed(llm_tiny(tie_embeddings=True))
    untied = DecoderLM(llm_tiny(tie_embeddings=False))
    state = tied.state_dict()
    untied.load_state_dict({**state, "lm_head": state["embed_tokens.weight"]})
    assert tied.output_weight is tied.embed_tokens.weight
    v, c = tied.config.vocab_size, tied.config.hidden_size
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == v * c

    ids, cu = packed_inputs(v)
    labels = next_token_labels(ids, BOUNDS)
    for model in (tied, untied):
        model.loss(model(ids, cu).hidden, labels).backward()
    assert_close(tied.embed_tokens.weight.grad, untied.embed_tokens.weight.grad + untied.lm_head.grad,
                 name="d(tied weight)")
    assert untied.lm_head.grad.abs().sum() > 0 and untied.embed_tokens.weight.grad.abs().sum() > 0


def test_mmtp_head_trains_on_top():
    tokenizer = ByteTokenizer()
    config = llm_tiny()
    model = DecoderLM(config)
    head = MMTPHead(config.hidden_size, 2, model.block_factory, model.embed_tokens, model.output_weight, model.norm,
                    tokenizer.token_id(IMAGE))
    assert head.output_weight is model.output_weight and head.embedding is model.embed_tokens
    assert type(head.blocks[0]) is type(model.layers[0])
    # two documents of a repeated phrase, the second with an image run inside
    texts = ["abcdefg " * 4, "xyz <|image|><|image|><|image|> " * 3]
    docs = [torch.tensor(tokenizer.encode(t)) for t in texts]
    ids = torch.cat(docs)
    bounds = [0, len(docs[0]), len(ids)]
    cu = torch.tensor(bounds, dtype=torch.int32)
    is_visual = ids == tokenizer.token_id(IMAGE)
    labels = next_token_labels(ids, bounds)
    labels[labels == tokenizer.token_id(IMAGE)] = IGNORE_INDEX
    # one ModuleList, so the parameters the head shares with the model are listed once
    optimizer = torch.optim.AdamW(torch.nn.ModuleList([model, head]).parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        out = model(ids, cu)
        mtp = head(out.prenorm[None], ids[None], labels[None], is_visual[None], cu_seqlens=cu, **out.block_kwargs)
        main = model.loss(out.hidden, labels)
        optimizer.zero_grad()
        (main + mtp.loss).backward()
        optimizer.step()
        history.append((main.item(), mtp.depth_losses.tolist()))
    (main0, depths0), (main1, depths1) = history[0], history[-1]
    assert main1 < 0.5 * main0
    assert all(d1 < 0.5 * d0 for d0, d1 in zip(depths0, depths1)), (depths0, depths1)


@pytest.mark.interpreter
def test_kernels_agree_with_the_cpu_path():
    """The Triton kernels (attention, fused cross-entropy) against the CPU reference path: on a GPU
    when there is one, else under the Triton interpreter."""
    config = llm_tiny(num_layers=1)
    model = perturbed(config)
    bounds = [0, 5, 16]
    ids, cu = packed_inputs(config.vocab_size, bounds)
    labels = next_token_labels(ids, bounds)
    kernel_model = copy.deepcopy(model).to(DEVICE)
    results = []
    for m, backend, device in ((model, "torch", "cpu"), (kernel_model, KERNEL_BACKEND, DEVICE)):
        with use_backend(backend):
            out = m(ids.to(device), cu)
            loss = m.loss(out.hidden, labels.to(device))
            results.append((out.hidden, loss, torch.autograd.grad(loss, list(m.parameters()))))
    (hidden, loss, grads), (hidden_k, loss_k, grads_k) = results
    assert_close(hidden_k, hidden, tol=TOL, name="hidden")
    assert_close(loss_k, loss, tol=TOL, name="loss")
    for (name, _), g_k, g in zip(model.named_parameters(), grads_k, grads):
        assert_close(g_k, g, tol=TOL, name=f"d{name}")


def test_1b_preset_on_the_meta_device():
    config = llm_1b()
    with torch.device("meta"):
        model = DecoderLM(config)
    assert all(p.is_meta for p in model.parameters())
    c, d, f = config.hidden_size, config.head_dim, config.mlp_hidden
    heads = config.num_heads + 2 * config.num_kv_heads
    per_block = c * heads * d + heads * d + config.num_heads * d * c + 3 * c * f + 2 * c
    expected = config.vocab_size * c + config.num_layers * per_block + c
    assert sum(p.numel() for p in model.parameters()) == expected == 1_015_130_112
    assert config.rotary_dim == d // 2 and config.tie_embeddings


@pytest.mark.parametrize("overrides,match", [
    pytest.param(dict(num_heads=4, num_kv_heads=3), "num_kv_heads", id="heads-not-grouped"),
    pytest.param(dict(num_kv_heads=0), "num_kv_heads", id="no-kv-heads"),
    pytest.param(dict(head_dim=20), "head_dim", id="head-dim-not-multiple-of-8"),
    pytest.param(dict(rot_dim=18), "rot_dim", id="rot-dim-above-head-dim"),
    pytest.param(dict(rot_dim=7), "rot_dim", id="odd-rot-dim"),
    pytest.param(dict(norm_eps=0.0), "norm_eps", id="zero-eps"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        llm_tiny(**overrides)


def test_bad_forward_input_raises():
    model = DecoderLM(llm_tiny())
    ids, cu = packed_inputs(model.config.vocab_size)
    embeds = torch.randn(len(ids), model.config.hidden_size)
    cases = [
        (dict(input_ids=ids, cu_seqlens=cu, inputs_embeds=embeds), ValueError, "exactly one"),
        (dict(cu_seqlens=cu), ValueError, "exactly one"),
        (dict(input_ids=ids), ValueError, "cu_seqlens"),
        (dict(input_ids=ids.float(), cu_seqlens=cu), TypeError, "input_ids"),
        (dict(input_ids=ids[None], cu_seqlens=cu), ValueError, "input_ids"),
        (dict(input_ids=ids + model.config.vocab_size, cu_seqlens=cu), ValueError, "vocab_size"),
        (dict(input_ids=ids[:-1], cu_seqlens=cu), ValueError, "cover"),
        (dict(inputs_embeds=embeds[:, :-1], cu_seqlens=cu), ValueError, "inputs_embeds"),
        (dict(input_ids=ids, cu_seqlens=cu, position_ids=torch.arange(3)), ValueError, "position_ids"),
        (dict(input_ids=ids, cu_seqlens=cu, max_seqlen=4), ValueError, "max_seqlen"),
        (dict(input_ids=ids, plan=cu), TypeError, "plan"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            model(**kwargs)
    with pytest.raises(TypeError, match="DecoderLMConfig"):
        DecoderLM(dict(hidden_size=64))
