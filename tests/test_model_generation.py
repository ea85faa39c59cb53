"""Tests for llmstages.model (GPT, KV cache, helpers) and llmstages.generation (batched sampling)."""

import math

import pytest
import torch
from torch import nn

from llmstages.generation import generate, left_pad, positions_from_mask
from llmstages.model import (
    GPT, GPTConfig, KVCache, ScalarHead, apply_rope, last_token_index, rms_norm, rope_tables, swiglu,
)
from llmstages.optim import param_groups

VOCAB = 50
PROMPTS = [[3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]  # lengths 2, 5, 9
PAD = 0
NEVER = -1  # an eos id the model can never produce: generations run to max_new_tokens


def small_cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return GPTConfig(**base)


def make_model(seed: int = 0, **kw) -> GPT:
    """A small random GPT in eval mode. The 2-D weights are re-drawn with a large std: with the default
    0.02 init and tied embeddings the model just repeats its last input token, which makes generation
    tests vacuous; with std 0.3 greedy continuations are varied."""
    torch.manual_seed(seed)
    model = GPT(small_cfg(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


def greedy(model, prompts, n, eos_id=NEVER):
    return generate(model, prompts, n, eos_id=eos_id, pad_id=PAD, temperature=0.0)


# ---------------------------------------------------------------- GPT / config


def test_forward_and_hidden_shapes(model):
    tokens = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
        h = model.hidden(tokens)
    assert logits.shape == (3, 7, VOCAB)
    assert h.shape == (3, 7, 32)
    assert torch.allclose(model.lm_head(h), logits)
    assert ScalarHead(32)(h).shape == (3, 7)


def test_tied_and_untied_embeddings():
    tied = GPT(small_cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = GPT(small_cfg(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    # the shared matrix is counted once in the parameter total
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == VOCAB * 32


@pytest.mark.parametrize("tied", [True, False])
def test_from_weights_is_the_saved_model(tied):
    """GPT.from_weights (no random initialisation) gives the model whose weights it is handed: same logits,
    embeddings tied again when the config ties them, the rotary tables of a freshly built model, float32."""
    torch.manual_seed(0)
    cfg = small_cfg(tie_embeddings=tied)
    src = GPT(cfg).eval()
    sd = {k: v.clone().double() for k, v in src.state_dict().items()}  # any float dtype comes back as float32
    model = GPT.from_weights(cfg, sd).eval()
    tokens = torch.tensor([PROMPTS[2]])
    assert torch.equal(model(tokens), src(tokens))
    assert (model.lm_head.weight is model.embed.weight) == tied
    assert len(list(model.parameters())) == len(list(src.parameters()))
    assert torch.equal(model.rope_cos, src.rope_cos) and torch.equal(model.rope_sin, src.rope_sin)
    assert "rope_cos" not in model.state_dict()  # still a non-persistent buffer
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    sd["norm.weight"] = torch.ones(cfg.d_model + 1)
    with pytest.raises(RuntimeError, match="size mismatch for norm.weight"):
        GPT.from_weights(cfg, sd)


def test_config_validation():
    with pytest.raises(ValueError):
        GPTConfig(d_model=30, n_heads=4)  # not divisible
    with pytest.raises(ValueError):
        GPTConfig(d_model=12, n_heads=4)  # head dim 3 is odd (RoPE)
    assert GPTConfig(d_model=32, n_heads=4).d_ff == 128  # 8/3 * 32 = 85.3 -> rounded up to 64 multiple


def test_position_beyond_max_seq_len_raises():
    m = GPT(small_cfg(max_seq_len=8)).eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, VOCAB)  # positions 0..7 are fine
        with pytest.raises(ValueError):
            m(torch.zeros(1, 9, dtype=torch.long))
        with pytest.raises(ValueError):
            m(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[0, 8]]))


def test_kv_cache_matches_full_forward(model):
    torch.manual_seed(2)
    B, T, k = 2, 12, 5
    tokens = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, B, T, tokens.device, torch.float32)
        steps = [model(tokens[:, :k], cache=cache)]  # prefill: plain causal on an empty cache
        assert cache.length == k
        for i in range(k, T):
            steps.append(model(tokens[:, i:i + 1], cache=cache))  # one token at a time
        assert cache.length == T
        with pytest.raises(ValueError):  # the cache is full
            model(tokens[:, :1], cache=cache)
    incremental = torch.cat(steps, dim=1)
    assert full.dtype == incremental.dtype == torch.float32
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_kv_cache_chunked_continuation_without_mask(model):
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg, 1, 10, tokens.device, torch.float32)
        model(tokens[:, :5], cache=cache)
        rest = model(tokens[:, 5:], cache=cache)  # 5 new tokens attend to 5 cached + themselves, causally
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=0)


def test_causality(model):
    torch.manual_seed(3)
    a = torch.randint(0, VOCAB, (1, 10))
    b = a.clone()
    b[0, 6] = (a[0, 6] + 1) % VOCAB
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :6], lb[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(la[:, 6], lb[:, 6])


def test_left_padding_matches_prompt_alone(model):
    tokens, mask = left_pad(PROMPTS, PAD)
    P = tokens.shape[1]
    assert P == 9
    assert mask.sum(1).tolist() == [2, 5, 9]
    pos = positions_from_mask(mask)
    assert pos[0].tolist() == [0] * 7 + [0, 1]
    # attention mask as generate() builds it for the prefill
    attn = torch.ones(P, P, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    attn |= torch.eye(P, dtype=torch.bool)[None]
    with torch.no_grad():
        batched = model(tokens, positions=pos, attn_mask=attn)
        for i, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p]))
            torch.testing.assert_close(batched[i, -1], alone[0, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched[i, P - len(p):], alone[0], atol=1e-5, rtol=0)  # all real tokens


# ---------------------------------------------------------------- generation


def test_batched_greedy_equals_single_greedy(model):
    n = 12
    batch = greedy(model, PROMPTS, n)
    assert batch.prompt_len == 9
    assert batch.tokens.shape == (3, 9 + n)
    assert batch.responses.shape == (3, n)
    assert batch.response_mask.eq(1).all() and not batch.finished.any()
    assert batch.attention_mask[:, 9:].eq(1).all()
    assert batch.attention_mask[:, :9].sum(1).tolist() == [2, 5, 9]
    for i, p in enumerate(PROMPTS):
        single = greedy(model, [p], n)
        assert single.prompt_len == len(p)
        assert single.tokens[0, :len(p)].tolist() == p
        assert single.responses[0].tolist() == batch.responses[i].tolist()
    # non-degenerate: not just one token repeated
    assert len(set(batch.responses.flatten().tolist())) > 5


def test_greedy_eos_early_stop(model):
    n = 12
    ref = greedy(model, PROMPTS, n).responses  # never stops
    eos = int(ref[0, 2])
    assert eos not in ref[0, :2].tolist()  # row 0 first emits it at step 2
    g = greedy(model, PROMPTS, n, eos_id=eos)
    R = g.responses.shape[1]
    for i in range(3):
        row = ref[i].tolist()
        stop = row.index(eos) if eos in row else None
        if stop is None:
            assert not g.finished[i]
            assert g.responses[i].tolist() == row[:R]
            assert g.response_mask[i].eq(1).all()
        else:
            assert g.finished[i]
            assert g.responses[i, :stop + 1].tolist() == row[:stop + 1]  # up to and including EOS
            assert g.response_mask[i].tolist() == [1] * (stop + 1) + [0] * (R - stop - 1)
            assert g.responses[i, stop + 1:].eq(PAD).all()
            assert g.attention_mask[i, g.prompt_len:].tolist() == g.response_mask[i].tolist()
    assert g.finished[0] and g.response_mask[0].sum().item() == 3
    # the output is cut when every row has stopped, or runs to max_new_tokens
    assert R == (n if not g.finished.all() else max(int(m.sum()) for m in g.response_mask))


def test_eos_all_rows_stop_trims_output(model):
    ref = greedy(model, [PROMPTS[1]], 12).responses[0].tolist()
    eos = ref[3]
    g = greedy(model, [PROMPTS[1]], 12, eos_id=eos)
    stop = ref.index(eos)
    assert g.finished.tolist() == [True]
    assert g.responses.shape == (1, stop + 1)
    assert g.responses[0].tolist() == ref[:stop + 1]


def test_generate_restores_training_mode():
    m = make_model().train()
    greedy(m, PROMPTS[:1], 3)
    assert m.training
    with pytest.raises(ValueError):
        greedy(m, [[1, 2], []], 3)  # empty prompt


def test_sampling_reproducible_with_generator(model):
    def sample(seed, **kw):
        return generate(model, PROMPTS, 10, eos_id=NEVER, pad_id=PAD, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kw).tokens

    a, b = sample(123), sample(123)
    assert torch.equal(a, b)
    assert torch.equal(sample(7, top_k=5), sample(7, top_k=5))
    assert torch.equal(sample(7, top_p=0.9), sample(7, top_p=0.9))
    assert not torch.equal(a, sample(124))  # 30 tokens from a 50-way distribution: a collision is ~impossible


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    ref = greedy(model, PROMPTS, 10).tokens
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        g = generate(model, PROMPTS, 10, eos_id=NEVER, pad_id=PAD, temperature=1.5,
                     generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(g.tokens, ref), kw


def test_generate_shortens_to_max_seq_len():
    m = make_model(max_seq_len=16)
    g = generate(m, [[1] * 10], 10, eos_id=-1, pad_id=0, temperature=0)
    assert g.tokens.shape == (1, 16) and g.response_mask.sum() == 6  # 16 - 10 positions left


# ---------------------------------------------------------------- helpers


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 0, 3]
    assert last_token_index(mask.bool()).tolist() == [2, 0, 3]


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_gpt(tied):
    m = GPT(small_cfg(tie_embeddings=tied))
    decay_g, no_decay_g = param_groups(m, 0.1)
    assert decay_g["weight_decay"] == 0.1 and no_decay_g["weight_decay"] == 0.0
    decay = {id(p) for p in decay_g["params"]}
    no_decay = {id(p) for p in no_decay_g["params"]}
    assert len(decay) == len(decay_g["params"]) and not decay & no_decay
    L = m.cfg.n_layers
    # matrices: embed (+ lm_head if untied), and qkv, proj, gate_up, down per layer
    assert len(decay_g["params"]) == (1 if tied else 2) + 4 * L
    assert id(m.embed.weight) in decay and id(m.lm_head.weight) in decay
    for blk in m.blocks:
        assert {id(blk.attn.qkv.weight), id(blk.attn.proj.weight), id(blk.mlp.gate_up.weight),
                id(blk.mlp.down.weight)} <= decay
        assert {id(blk.attn_norm.weight), id(blk.mlp_norm.weight)} <= no_decay
    assert id(m.norm.weight) in no_decay
    assert len(no_decay_g["params"]) == 2 * L + 1
    n_unique = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    assert sum(p.numel() for g in (decay_g, no_decay_g) for p in g["params"]) == n_unique


def test_param_groups_biases_and_frozen():
    shared = nn.Linear(4, 4)
    m = nn.ModuleDict({"a": shared, "b": shared, "head": ScalarHead(4), "frozen": nn.Linear(4, 2)})
    m["frozen"].requires_grad_(False)
    decay_g, no_decay_g = param_groups(m, 0.01)
    assert {id(p) for p in decay_g["params"]} == {id(shared.weight), id(m["head"].linear.weight)}
    assert {id(p) for p in no_decay_g["params"]} == {id(shared.bias), id(m["head"].linear.bias)}
    assert len(decay_g["params"]) == 2 and len(no_decay_g["params"]) == 2  # shared module counted once


class CharTokenizer:
    """A stand-in tokenizer for probe tests: one id per character (mod the vocabulary), EOS never produced."""

    bos_id, eos_id, pad_id = 1, NEVER, 0

    def encode(self, text: str) -> list[int]:
        return [2 + ord(c) % (VOCAB - 3) for c in text]

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text)]

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def test_a_long_probe_prompt_does_not_shorten_the_other_answers(model):
    from llmstages.evaluation import probe_answers

    tok, short = CharTokenizer(), "What's 2 + 2?"
    alone, _ = probe_answers(model, tok, [short], 8, chat=True)
    both, gens = probe_answers(model, tok, [short, "x" * 500], 8, chat=True)  # 500 > max_seq_len 64
    assert both[0] == alone[0] and len(alone[0].split()) == 8
    assert len(both[1].split()) == 1 and len(gens) == 2  # the long one is cut to leave room for 1 token


# ---------------------------------------------------------------- element-wise layers with written-out backward


def test_rope_rotates_pairs_by_position_and_its_gradient_is_exact():
    """Position 1, angle 1 rad per pair at frequency 1 (theta=1): [1, 0 | 0, 1] -> [cos 1, -sin 1 | sin 1, cos 1];
    strided q/k views give what the chunk/cat formula gives; the backward passes gradcheck in float64."""
    cos, sin = rope_tables(4, 4, theta=1.0)  # inv_freq = [1, 1]
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 4)
    out = apply_rope(x, cos[1:2], sin[1:2])
    c, s = math.cos(1.0), math.sin(1.0)
    assert out.flatten().tolist() == pytest.approx([c, -s, s, c])
    cos, sin = rope_tables(16, 8, 10000.0)
    qkv = torch.randn(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh) as Attention views it
    c, s = cos[None, None, None], sin[None, None, None]  # (1, 1, 1, T, Dh/2)
    x1, x2 = qkv[:2].chunk(2, dim=-1)
    out = apply_rope(qkv[:2], c, s)
    torch.testing.assert_close(out, torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1))
    assert out[0].is_contiguous() and out[1].is_contiguous()  # queries and keys each contiguous for attention
    x64 = torch.randn(2, 2, 2, 16, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: apply_rope(z, c.double(), s.double()), (x64,))
    bf = apply_rope(qkv[:2].bfloat16(), c, s)  # rotated in float32, returned in the input's dtype
    assert bf.dtype == torch.bfloat16


def test_rms_norm_values_and_gradients():
    """Row [3, 4]: mean square 12.5, so x / sqrt(12.5) * w; values equal F.rms_norm's; gradcheck in float64 for
    the input and the gain; float32 gradients equal autograd through the composite."""
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    assert rms_norm(x, w, 0.0).flatten().tolist() == pytest.approx([3 / math.sqrt(12.5), 8 / math.sqrt(12.5)])
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16)).requires_grad_()
    g = torch.randn(3, 5, 16)
    ours = rms_norm(x, w, 1e-5)
    ours.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    ref.backward(g)
    torch.testing.assert_close(ours, torch.nn.functional.rms_norm(x, (16,), w, 1e-5), rtol=0, atol=0)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)
    x64, w64 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64,
                                                                                           requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x64, w64))
    assert rms_norm(x.detach().bfloat16(), w.detach(), 1e-5).dtype == torch.bfloat16


def test_swiglu_values_and_gradient():
    """silu(g) * u with g, u the two halves: [g=0, u=5] -> 0; [g=1, u=2] -> 2 / (1 + e^-1); gradcheck in float64."""
    out = swiglu(torch.tensor([[0.0, 1.0, 5.0, 2.0]]))
    assert out.flatten().tolist() == pytest.approx([0.0, 2 / (1 + math.exp(-1))])
    x64 = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x64,))
