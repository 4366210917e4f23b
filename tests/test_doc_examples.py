"""The runnable examples in public docstrings (those not marked ``+SKIP``) still run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import auditor.calibration
import auditor.engine.localise
import auditor.engine.maps
import auditor.profile


@pytest.mark.parametrize("module", [auditor.profile, auditor.calibration, auditor.engine.localise,
                                    auditor.engine.maps], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if module is auditor.profile:  # profile_for's example runs on the bundled model
        assert result.attempted >= 3
