"""`python -m seechat.cli <verb> ...` (what `torchrun` and `accelerate launch -m` start)."""

import sys

from seechat.cli import main

sys.exit(main())
