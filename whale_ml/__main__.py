import sys

from whale_ml.cli import main

sys.exit(main())
