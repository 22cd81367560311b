"""``python -m lora_course.notebook_tools ...``: see :mod:`.cli`."""

import sys

from .cli import main

sys.exit(main())
