"""ShuffledBatches: transformers' length-grouped batches, each unchanged, in random order."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_sweep.trial.train import ShuffledBatches


def batches(order, size=32):
    return [tuple(order[i:i + size]) for i in range(0, len(order), size)]


def longest(order, lengths, size=32):
    return [max(lengths[i] for i in b) for b in batches(order, size)]


def test_the_same_batches_as_length_grouping_in_shuffled_order():
    lengths = torch.randint(5, 60, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = LengthGroupedSampler(32, lengths=lengths)
    torch.manual_seed(1)
    theirs = list(grouped)
    torch.manual_seed(1)
    ours = list(ShuffledBatches(grouped))
    assert len(ours) == len(grouped) == 2000 and sorted(ours) == list(range(2000))
    # every batch is one of theirs, unchanged: the padding saved is the same
    assert sorted(map(sorted, batches(ours))) == sorted(map(sorted, batches(theirs)))
    # theirs walk each mega-batch from long to short; ours do not
    steps_down = lambda order: sum(a > b for a, b in zip(longest(order, lengths), longest(order, lengths)[1:]))
    assert steps_down(theirs) > 50 and steps_down(ours) < 45
    # the longest batch still first (out of memory at once), the partial batch (2000 = 62 x 32 + 16) still last
    assert batches(ours)[0] == batches(theirs)[0] and max(longest(ours, lengths)) == longest(ours, lengths)[0]
    assert batches(ours)[-1] == batches(theirs)[-1] and len(batches(ours)[-1]) == 16
    # reproducible under torch's seed, as the trial's set_seed makes it
    torch.manual_seed(1)
    assert list(ShuffledBatches(grouped)) == ours


def test_trainer_serves_length_grouped_batches_shuffled(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from lora_sweep.trial.train import _Trainer

    data = Dataset.from_dict({"input_ids": [[1] * n for n in range(1, 101)], "labels": [0] * 100})
    for strategy, kind in (("group_by_length", ShuffledBatches), ("random", torch.utils.data.RandomSampler)):
        args = TrainingArguments(output_dir=str(tmp_path), train_sampling_strategy=strategy, use_cpu=True,
                                 per_device_train_batch_size=8, report_to="none")
        trainer = _Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data)
        assert isinstance(trainer._get_train_sampler(), kind)
