"""How setup.py builds the optional extension ``dsnot_kernels._C`` (owned by the extension work).

Returns extra ``setup()`` keyword arguments; an empty dict means "no extension".
"""
import os


def extension_setup_kwargs() -> dict:
    if os.environ.get("DSNOT_BUILD_EXT", "auto") == "0":
        print("dsnot_kernels: extension skipped (DSNOT_BUILD_EXT=0)")
        return {}
    return {}
