"""FastDropout (lora_sweep/dropout.py) must be nn.Dropout in distribution, gradient and reproducibility."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lora_sweep.trial.dropout import FastDropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keeps_each_value_with_probability_one_minus_p_and_scales_it(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    out = FastDropout(p).train()(x)
    kept = out != 0
    n = x.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd   # a binomial proportion, 5 sigma
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert abs(out.mean().item() - 1.0) < 5 * sd / (1 - p)      # unbiased, as nn.Dropout is


def test_masks_are_independent_between_calls_and_between_elements():
    torch.manual_seed(0)
    d = FastDropout(0.5).train()
    a, b = (d(torch.ones(200_000)) != 0 for _ in range(2))
    # Two independent Bernoulli(0.5) masks agree on half the elements; neighbours likewise.
    assert abs((a == b).float().mean().item() - 0.5) < 0.01
    assert abs((a[1:] == a[:-1]).float().mean().item() - 0.5) < 0.01


def test_gradient_is_the_same_mask_and_scale_as_the_forward():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    out = FastDropout(0.3).train()(x)
    out.backward(torch.ones_like(out))
    expected = torch.where(out != 0, torch.full_like(x, 1 / 0.7), torch.zeros_like(x))
    assert torch.equal(x.grad, expected)

    def seeded(t):  # the same mask at every call: gradcheck's finite differences need a fixed function
        torch.manual_seed(1)
        return FastDropout(0.3).train()(t)

    assert torch.autograd.gradcheck(seeded, (torch.randn(5, 4, dtype=torch.float64, requires_grad=True),))


def test_torch_seed_makes_it_reproducible():
    d = FastDropout(0.2).train()
    torch.manual_seed(7)
    a = d(torch.ones(1000))
    torch.manual_seed(7)
    b = d(torch.ones(1000))
    torch.manual_seed(8)
    c = d(torch.ones(1000))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_in_eval_mode_and_at_p_zero_like_nn_dropout():
    x = torch.randn(10, 10)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x


def test_keeps_the_input_dtype():
    x = torch.ones(100, dtype=torch.bfloat16, requires_grad=True)
    out = FastDropout(0.5).train()(x)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_swaps_every_dropout_of_a_peft_model_and_keeps_its_p():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2))
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.25,
                                                  target_modules=["query", "value"]))
    before = [(n, m.p) for n, m in peft_model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    lora = [n for n, _ in before if "lora_dropout" in n]
    assert len(lora) == 4  # 2 layers x query, value

    swapped = use_fast_dropout(peft_model)
    after = [(n, m.p) for n, m in peft_model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert swapped == len(before) and after == before
    assert all(type(m) is FastDropout for n, m in peft_model.named_modules() if n in dict(before))
    assert use_fast_dropout(peft_model) == 0  # already swapped

    # The swapped model trains: LoRA weights get gradients through the new masks.
    ids = torch.randint(0, 100, (4, 9))
    peft_model.train()
    peft_model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # lora_A: B starts at 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_given_torchs_own_mask_bits_a_swapped_model_trains_exactly_like_the_original(monkeypatch):
    """Everything the swap changes except the random bits: the module masks, peft's lora_dropout, the
    attention function and the autograd of all three. Fed nn.Dropout's own draw (bernoulli_(1 - p)
    on a tensor of the same size, in the same order), five optimizer steps of a LoRA BERT with padding
    must give the original's losses and weights; so the swapped model differs from torch's only in
    which elements each mask drops."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    import lora_sweep.trial.dropout as dropout

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=2, attn_implementation="sdpa"))
    ids = torch.randint(0, 100, (8, 12))
    attention_mask = torch.ones(8, 12, dtype=torch.long)
    attention_mask[4:, 9:] = 0
    labels = torch.randint(0, 2, (8,))

    def train(fast: bool):
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "key", "value", "dense"]))
        if fast:
            assert use_fast_dropout(model) > 0
            assert model.base_model.model.config._attn_implementation == dropout.ATTENTION
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        torch.manual_seed(7)
        losses = []
        for _ in range(5):
            loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, [p.detach() for p in params]

    original = train(fast=False)
    monkeypatch.setattr(dropout, "_keep_mask", lambda numel, p: torch.empty(numel).bernoulli_(1 - p).bool().numpy())
    swapped = train(fast=True)
    assert swapped[0] == pytest.approx(original[0], rel=1e-6)
    for a, b in zip(swapped[1], original[1]):
        torch.testing.assert_close(a, b)  # float32 rounding of the mask's 1/(1-p) scale only


def test_a_swapped_model_in_eval_mode_computes_exactly_what_the_original_does():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()
    fast = copy.deepcopy(model)
    use_fast_dropout(fast)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(input_ids=ids).last_hidden_state, fast(input_ids=ids).last_hidden_state)


# -- attention-probability dropout (dropout.attention, registered as ATTENTION) ----------------------

def _qkv(batch=2, heads=3, length=6, dim=4, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, length, dim, generator=g, dtype=dtype, requires_grad=requires_grad)
            for _ in range(3)]


def _module(training: bool, is_causal: bool = False) -> nn.Module:
    m = nn.Module()
    m.is_causal = is_causal
    return m.train(training)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_attention_in_training_is_softmax_then_the_fast_mask_then_v(mask_kind):
    from lora_sweep.trial.dropout import _keep_mask, attention

    q, k, v = _qkv()
    keep_keys = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]  # batch 1: 2 padded keys
    mask = {"bool": keep_keys, "none": None,
            "additive": torch.where(keep_keys, 0.0, torch.finfo(torch.float32).min)}[mask_kind]
    p = 0.3
    torch.manual_seed(5)
    out, weights = attention(_module(True), q, k, v, mask, dropout=p, scaling=0.5)

    scores = q @ k.transpose(-2, -1) * 0.5
    if mask_kind != "none":
        scores = scores.masked_fill(~keep_keys, float("-inf"))
    torch.manual_seed(5)  # the same seed draws the same mask
    keep = torch.from_numpy(_keep_mask(scores.numel(), p)).view(scores.shape)
    expected = (torch.softmax(scores, -1) * keep / (1 - p)) @ v
    assert weights is None
    assert out.shape == (2, 6, 3, 4)  # batch x length x heads x dim, as transformers' SDPA returns it
    torch.testing.assert_close(out, expected.transpose(1, 2))
    if mask_kind != "none":  # padded keys get no attention at all
        probs_on_padding = (torch.softmax(scores, -1) * keep)[1, ..., 4:]
        assert torch.count_nonzero(probs_on_padding) == 0


def test_attention_equals_torchs_sdpa_math_path_given_the_same_dropout_mask():
    """The function replaces SDPA's math path in training: torch's own reference implementation,
    fed our mask through its testing-only `dropout_mask`, must give the same output and gradients.
    (The op takes masks already in additive form: SDPA converts bool masks before calling it.)"""
    import warnings

    from lora_sweep.trial.dropout import _keep_mask, attention

    q, k, v = _qkv(requires_grad=True)
    keep_keys = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    p = 0.1
    torch.manual_seed(11)
    ours, _ = attention(_module(True), q, k, v, keep_keys, dropout=p, scaling=None)
    torch.manual_seed(11)
    keep = torch.from_numpy(_keep_mask(2 * 3 * 6 * 6, p)).view(2, 3, 6, 6)
    additive = torch.zeros(keep_keys.shape).masked_fill(~keep_keys, float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Dropout mask should only be used for testing purposes": we are
        theirs, _ = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, additive, p, False,
                                                                     dropout_mask=keep)
    theirs = theirs.transpose(1, 2)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(theirs, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


def test_attention_gradient_matches_autograd_of_the_same_function():
    from lora_sweep.trial.dropout import attention

    def seeded(q, k, v):
        torch.manual_seed(3)
        return attention(_module(True), q, k, v, None, dropout=0.2, scaling=0.7)[0]

    assert torch.autograd.gradcheck(seeded, tuple(_qkv(1, 2, 4, 3, torch.float64, requires_grad=True)))


@pytest.mark.parametrize("case", ["eval", "p=0", "causal without mask", "grouped heads", "softcap"])
def test_attention_leaves_every_other_case_to_transformers_sdpa(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lora_sweep.trial.dropout import attention

    q, k, v = _qkv()
    module, kwargs, dropout = _module(case != "eval", is_causal=case == "causal without mask"), {}, 0.1
    if case == "p=0":
        dropout = 0.0
    if case == "grouped heads":
        module.num_key_value_groups = 3
        k, v = k[:, :1], v[:, :1]
    if case == "softcap":
        kwargs["softcap"] = 30.0
    calls = []

    def spy(*args, **kw):
        calls.append(1)
        return sdpa_attention_forward(*args, **kw)

    from transformers import AttentionInterface

    original = sdpa_attention_forward
    AttentionInterface.register("sdpa", spy)
    try:
        if case == "softcap":  # transformers' SDPA refuses softcap: the refusal must reach the user
            with pytest.raises(ValueError, match="softcap"):
                attention(module, q, k, v, None, dropout=dropout, **kwargs)
        else:
            torch.manual_seed(1)
            out, _ = attention(module, q, k, v, None, dropout=dropout, **kwargs)
            torch.manual_seed(1)
            expected, _ = original(module, q, k, v, None, dropout=dropout, **kwargs)
            assert torch.equal(out, expected)
    finally:
        AttentionInterface.register("sdpa", original)
    assert calls == [1]


@pytest.mark.parametrize("argument", ["position_bias", "is_causal", "head_mask", "sliding_window",
                                      "a_future_argument"])
def test_an_attention_argument_the_fast_path_does_not_take_gets_transformers_own_sdpa(argument):
    """In training on a CPU with dropout, the one case the fast path computes, any keyword it does not
    name must reach the function the model had (SDPA): its output, with torch's own dropout mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lora_sweep.trial.dropout import attention

    q, k, v = _qkv()
    value = {"position_bias": torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1)),
             "is_causal": True, "head_mask": torch.ones(3), "sliding_window": 2,
             "a_future_argument": torch.ones(2)}[argument]
    keep_keys = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    args = (_module(True), q, k, v, keep_keys)
    torch.manual_seed(3)
    ours, _ = attention(*args, dropout=0.1, scaling=0.5, **{argument: value})
    torch.manual_seed(3)
    theirs, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](*args, dropout=0.1, scaling=0.5, **{argument: value})
    assert torch.equal(ours, theirs)
    torch.manual_seed(3)
    fast, _ = attention(*args, dropout=0.1, scaling=0.5)  # the probe: without it, our masks
    assert not torch.equal(fast, theirs)


def test_a_bert_forward_passes_only_arguments_the_fast_path_takes():
    """The default sweep's model must keep the fast path: what BERT hands the attention function in
    training, called as transformers' Trainer calls it (num_items_in_batch goes down to every layer),
    is none but the arguments the fast path takes (others would send it to SDPA)."""
    from transformers import AttentionInterface, BertConfig, BertForSequenceClassification

    import lora_sweep.trial.dropout as dropout

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=2))
    use_fast_dropout(model)
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append({k for k, v in kwargs.items() if v is not None} - {"dropout", "scaling"})
        return dropout.attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(dropout.ATTENTION, spy)
    try:
        model.train()
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0
        model(input_ids=torch.randint(0, 100, (2, 5)), attention_mask=mask, labels=torch.tensor([0, 1]),
              num_items_in_batch=torch.tensor(2))
    finally:
        AttentionInterface.register(dropout.ATTENTION, dropout.attention)
    assert seen and all("num_items_in_batch" in s for s in seen)  # checks the probe
    assert all(s <= dropout._UNREAD_BY_SDPA for s in seen)


def test_fast_attention_off_swaps_the_masks_but_keeps_sdpa_and_on_says_so_once(caplog, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    import lora_sweep.trial.dropout as dropout

    monkeypatch.setattr(dropout, "_announced", False)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=2))
    off, on, again = (copy.deepcopy(model) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="lora_sweep"):
        assert use_fast_dropout(off, attention=False) > 0
        assert off.config._attn_implementation == "sdpa" and not caplog.records
        assert any(type(m) is FastDropout for m in off.modules())
        use_fast_dropout(on)
        use_fast_dropout(again)
    assert on.config._attn_implementation == again.config._attn_implementation == dropout.ATTENTION
    assert [r.getMessage() for r in caplog.records if r.name == "lora_sweep"] == [
        f"Attention dropout on the CPU: numpy masks through the {dropout.ATTENTION!r} attention function "
        f"in place of sdpa (train.fast_attention=false keeps sdpa)"]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_train_fast_attention_must_be_a_bool(make_config, value):
    from lora_sweep.config import ConfigError

    with pytest.raises(ConfigError, match="train.fast_attention must be true or false"):
        make_config({}, train={"fast_attention": value})


def test_a_swapped_bert_draws_no_torch_masks_in_training_and_its_original_keeps_sdpa():
    from torch.profiler import profile
    from transformers import BertConfig, BertForSequenceClassification

    from lora_sweep.trial.dropout import ATTENTION

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2))
    assert model.config._attn_implementation == "sdpa"
    fast = copy.deepcopy(model)  # what a trial gets: the cached base model must keep SDPA
    use_fast_dropout(fast)
    assert fast.config._attn_implementation == ATTENTION and model.config._attn_implementation == "sdpa"

    ids = torch.randint(0, 100, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0  # padding: transformers must still build the (SDPA) mask for our implementation
    labels = torch.tensor([0, 1, 0, 1])

    def bernoulli_calls(m) -> int:
        m.train()
        with profile() as prof:
            m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return sum(e.count for e in prof.key_averages() if "bernoulli" in e.key)

    assert bernoulli_calls(model) > 0  # the original draws its masks with torch (checks the probe)
    assert bernoulli_calls(fast) == 0

    # Padding is masked in the swapped model: changing a padded token changes nothing, in training too.
    fast.train()
    other = ids.clone()
    other[1, 5:] = 7
    torch.manual_seed(2)
    a = fast.bert(input_ids=ids, attention_mask=mask).last_hidden_state[1, :5]
    torch.manual_seed(2)
    b = fast.bert(input_ids=other, attention_mask=mask).last_hidden_state[1, :5]
    torch.testing.assert_close(a, b)


def test_a_model_without_attention_dropout_keeps_sdpa():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert model.config.attention_dropout == 0.0 and model.config._attn_implementation == "sdpa"
    use_fast_dropout(model)
    assert model.config._attn_implementation == "sdpa"
