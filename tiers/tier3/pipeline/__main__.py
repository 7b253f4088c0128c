"""`python -m tiers.tier3.pipeline worker ...`: what an agent runs to host one stage (see worker.py)."""
import sys

from tiers.tier3.pipeline.worker import main

sys.exit(main())
