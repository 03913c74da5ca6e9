"""``python -m metamorph_core.cli`` (for ``torchrun -m metamorph_core.cli train ...``)."""

from metamorph_core.cli import main

raise SystemExit(main())
