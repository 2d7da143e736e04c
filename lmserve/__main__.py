import sys

from lmserve.cli import main

sys.exit(main())
