"""`python -m lora_sweep ARGS` under an address-space limit: python limited_worker.py MB ARGS...

The heavy libraries are imported first, then RLIMIT_AS is set to the process's current virtual
size plus MB. A trial that allocates more gets a genuine allocation failure from the OS (no
fake exception): torch's CPU allocator raises, exactly as it does on a machine out of memory.
"""

import resource
import sys

import mlflow  # noqa: F401  (imported before the limit: it is part of every worker's baseline)
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

from lora_sweep.cli import main


def virtual_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


if __name__ == "__main__":
    limit = virtual_size() + int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    main()
