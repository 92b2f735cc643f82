"""`python -m tests.chaos --seconds 60 --seed N --pairing asgi-uvicorn`."""

import sys

from tests.chaos.harness import main

sys.exit(main())
