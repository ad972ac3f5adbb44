"""``python -m training STAGE ...`` (from the repository root): train the embedded models; see :mod:`training.cli`."""

from training.cli import main

main()
