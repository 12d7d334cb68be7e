import sys

from idempotent_worker.ops.cli import main

sys.exit(main())
