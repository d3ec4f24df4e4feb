"""`python -m lora_cai.export RUN_DIR`: export a run's policy or data (lora_cai.export.cli)."""

import sys

from lora_cai.export.cli import main

sys.exit(main())
