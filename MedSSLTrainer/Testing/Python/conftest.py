"""pytest setup for the MedSSLTrainer tests: the shared helpers live with the MedSSLSegment tests."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "MedSSLSegment",
                                "Testing", "Python"))

import slicer_testing_helpers  # noqa: E402

slicer_testing_helpers.addModulePaths()

from slicer_testing_helpers import fake_backend, scene, work_dir  # noqa: E402,F401
