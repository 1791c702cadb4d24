"""The ``whale`` command: ``demo-data``, ``run``, ``identify``, ``enroll``, ``review``, ``prune-gallery``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: whale COMMAND [ARGS]

commands:
  demo-data OUT [--preset demo|tiny|kaggle] [--seed N] [--scale F] [--photo-px MIN MAX] [--workers N]
                                                  write a synthetic data set in the Kaggle layout (kaggle: the real shape at scale F)
  run [--recipe YAML] [--fold foldN ...]          materialise the whole pipeline on $WHALE_DATA_DIR
  identify PHOTO_OR_DIR... [--json] [--report OUT.html]
                                                  the five most likely individuals per photo, from the newest gallery
  enroll CONFIRMED.csv --images DIR               add confirmed photos (image,individual_id) as a new gallery version
  review [--port N] [--host ADDR]                 a web page to review identified batches, decide and enrol
  prune-gallery --keep N [--dry-run]              delete all but the newest N gallery versions (never the current one)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo-data":
        from whale_ml.cli import main as core_main

        return core_main(["demo-data", *rest])
    if command == "run":
        from whale_assets.run import main as run_main

        return run_main(rest)
    if command in ("identify", "enroll"):
        from whale_assets.identify_cli import enroll_main, identify_main

        return (identify_main if command == "identify" else enroll_main)(rest)
    if command == "review":
        from whale_assets.review.cli import review_main

        return review_main(rest)
    if command == "prune-gallery":
        from whale_assets.identify_cli import prune_main

        return prune_main(rest)
    print(f"whale: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
