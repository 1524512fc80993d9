import sys

from llm_simulator.command import main

sys.exit(main())
