"""``python -m retouch.bench shapes|pie|merge|report|export-shapes ...`` (also usable with ``accelerate launch -m``)."""

import sys

from retouch.bench.cli import main

sys.exit(main())
