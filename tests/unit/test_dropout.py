"""FastDropout (lora_sweep/dropout.py) must be nn.Dropout in distribution, gradient and reproducibility."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_sweep.dropout import FastDropout, use_fast_dropout


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


def test_a_swapped_model_in_eval_mode_computes_exactly_what_the_original_does():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()
    fast = copy.deepcopy(model)
    use_fast_dropout(fast)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(input_ids=ids).last_hidden_state, fast(input_ids=ids).last_hidden_state)
