"""bench: benchmarks and their baselines, never imported by the product.

    python -m lora_sweep.bench            the rank sweep against a Trainer-per-config script (rank, baseline)
    python -m lora_sweep.bench.search     TPE with pruning against the grid (search)
"""
