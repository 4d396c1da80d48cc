"""``python -m lcmserve.cli``, as ``accelerate launch -m`` and ``torchrun -m`` start it."""

import sys

from lcmserve.cli import main

sys.exit(main())
