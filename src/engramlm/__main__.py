"""``python -m engramlm``: the ``engramlm`` command (a Ctrl-C while it imports exits 130 in one line too)."""

import sys

try:
    from engramlm.cli.main import main
except KeyboardInterrupt:
    print("engramlm: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
