"""pytest setup for the MedSSLSegment tests: module folders on sys.path (as in Slicer) and shared fixtures."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import medssl_testing  # noqa: E402

medssl_testing.addModulePaths()

from medssl_testing import fake_backend, scene, work_dir  # noqa: E402,F401
