"""python -m lora_sweep: the same entry point as the `lora-sweep` command (lora_sweep.cli)."""

from lora_sweep.cli import main

if __name__ == "__main__":
    main()
