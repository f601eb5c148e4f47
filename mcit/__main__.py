"""`python -m mcit VERB ...`: the command line as a module, the entry point the deepspeed launcher starts on every
rank.

    deepspeed --num_gpus 8 --no_local_rank --module mcit train recipe.yaml
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --no_local_rank --module mcit train recipe.yaml   # CPU, gloo

A failure on any rank ends the whole job at once (`exit_on_error`) instead of leaving the others in a collective.
"""

from __future__ import annotations

import sys

from mcit.cli import main
from mcit.runtime.dist import exit_on_error

if __name__ == "__main__":
    with exit_on_error():
        code = main(sys.argv[1:])
    sys.exit(code)
