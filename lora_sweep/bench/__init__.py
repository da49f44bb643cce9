"""bench: benchmarks and their baselines, never imported by the product.

    python -m lora_sweep.bench            the rank sweep against a Trainer-per-config script (rank, baseline)
    python -m lora_sweep.bench.replay     search methods replayed over a stored exhaustive grid (replay)
    python -m lora_sweep.bench.sft        TRL's SFTTrainer against lora-sweep's trial path on chat data (sft)
    python -m lora_sweep.bench.chat_data  the instruction set both shapes of chat data are built from (chat_data)
    python -m lora_sweep.bench.memory     the memory model's prediction against measured peaks over a grid (memory)
"""
