import sys

from fedlora.cli import main

sys.exit(main())
