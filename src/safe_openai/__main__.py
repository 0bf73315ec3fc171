"""``python -m safe_openai``: the same as the ``safe-openai`` command."""

from ._cli import main

raise SystemExit(main())
