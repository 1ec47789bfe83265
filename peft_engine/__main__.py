import sys

from peft_engine.cli import main

sys.exit(main())
