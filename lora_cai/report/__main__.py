"""`python -m lora_cai.report RUN_DIR`: build the run's report (lora_cai.report.build)."""

import sys

from lora_cai.report.build import main

sys.exit(main())
