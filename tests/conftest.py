"""Test-wide settings: every Machine built by a test runs in strict mode (kmm.atomic):
shared state changed outside the shared-state layer raises StrictError."""

import os

os.environ.setdefault("KMM_STRICT", "1")
