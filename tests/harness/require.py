"""Skip-or-fail for tests whose prerequisites (ComfyUI, Chromium) are missing."""

from __future__ import annotations

import os

import pytest


def require_or_skip(env_var: str, reason: str) -> None:
    """Skip with ``reason``, or fail when ``env_var`` is set to ``1``
    (scripts/test.sh sets MPOD3D_REQUIRE_COMFYUI=1 and MPOD3D_REQUIRE_BROWSER=1)."""
    if os.environ.get(env_var) == "1":
        pytest.fail(f"{reason} ({env_var}=1, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)
