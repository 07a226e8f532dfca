"""pytest setup for the MedSSLSegment tests: module folders on sys.path (as in Slicer) and shared fixtures."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import slicer_testing_helpers  # noqa: E402

slicer_testing_helpers.addModulePaths()

from slicer_testing_helpers import fake_backend, scene, work_dir  # noqa: E402,F401
