"""The runnable examples in public docstrings (those not marked ``+SKIP``) still run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import auditor.calibration
import auditor.engine.hrv
import auditor.engine.localise
import auditor.engine.maps
import auditor.engine.trace
import auditor.profile
import auditor.store


@pytest.mark.parametrize("module", [auditor.profile, auditor.calibration, auditor.engine.localise,
                                    auditor.engine.maps, auditor.engine.hrv, auditor.store],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if module is auditor.profile:  # profile_for's example runs on the bundled model
        assert result.attempted >= 3
    if module is auditor.engine.trace:  # trace's and trace_image's examples run on the bundled model
        assert result.attempted >= 10
    if module is auditor.engine.hrv:  # calibrate's example runs on the bundled model
        assert result.attempted >= 6
    if module is auditor.store:  # RunStore's example writes, finishes and verifies a run folder
        assert result.attempted >= 4
