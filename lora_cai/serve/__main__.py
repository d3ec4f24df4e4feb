"""`python -m lora_cai.serve`: run the server (lora_cai.serve.server) until Ctrl-C."""

import os
import sys

from lora_cai.serve.server import main

code = main()
# The server has closed its socket and no generation is running (ChatServer.close); what is left is the
# interpreter's teardown of torch and the tokenizer libraries under idle daemon handler threads, which once
# ended in SIGABRT on a CI host after a clean stop. Nothing of ours is left to finalize: flush and leave.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
