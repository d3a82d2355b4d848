"""Test-suite settings.

Under CI the property-based tests run derandomized: the same examples on every run, so a
green or red result reflects the code and not the draw. Local runs keep exploring new
examples (and keep failures in the local example database).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
