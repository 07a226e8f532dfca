"""Slicer's translation functions for the MedSSL module files: ``tr`` (use as ``_``: the translation context is
the calling file, as with ``from slicer.i18n import tr as _``) and ``translate(context, text)``; on Slicer <
5.4, which has no ``slicer.i18n``, stand-ins that return the text unchanged."""

try:
    from slicer.i18n import tr, translate
except ImportError:  # Slicer < 5.4
    def tr(text):
        return text

    def translate(_context, text):
        return text

__all__ = ["tr", "translate"]
