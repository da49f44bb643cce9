import sys

from lora_sweep.bench.rank import main

sys.exit(main(sys.argv[1:]))
