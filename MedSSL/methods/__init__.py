"""Self-supervised methods, one module each, registered by name (see :mod:`MedSSL.methods.base`)."""

import importlib

#: modules that register a method when imported; add a new method's module here
METHOD_MODULES = ("genesis", "semantic_genesis", "transvw", "dira", "caid", "adam", "ark")


def load_all() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{module}")
