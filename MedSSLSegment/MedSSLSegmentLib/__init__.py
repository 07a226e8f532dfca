"""Slicer-side code of the MedSSLSegment module (Qt-free): :mod:`.logic` (``MedSSLSegmentLogic``, applying a
model bundle to a volume node). Shared pieces (job runner, node<->file conversion, backend discovery) come
from ``MedSSLCommonLib`` (the hidden MedSSLCommon module); see its package docstring for the layout."""
