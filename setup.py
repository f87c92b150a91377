"""Build the Cython hot paths in heidi/_fast; fall back to the pure-Python twins.

HEIDI_NO_EXTENSIONS=1 skips the compiled modules; a missing compiler or Cython falls back to the
twins with a notice instead of failing the install.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = os.environ.get("HEIDI_NO_EXTENSIONS", "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """A compile failure is a notice, not a failed install: the pure twins take over."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "use the twins"
            self._notice(exc)

    def build_extension(self, ext):
        openssl = ext.name.endswith("_chain_c") and not os.environ.get("HEIDI_NO_OPENSSL")
        if openssl:
            # the verify loop hashes with OpenSSL's SHA-256 (hashlib's own) when it can link it
            ext.define_macros.append(("HEIDI_HAVE_OPENSSL", "1"))
            ext.libraries.append("crypto")
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if not openssl:
                self._notice(exc, ext.name)
                return
            print(f"*** heidi: {ext.name}: could not build it with OpenSSL ({exc}); trying the "
                  "portable SHA-256", file=sys.stderr)
            ext.define_macros.remove(("HEIDI_HAVE_OPENSSL", "1"))
            ext.libraries.remove("crypto")
            try:
                super().build_extension(ext)
            except Exception as exc2:  # noqa: BLE001
                self._notice(exc2, ext.name)

    @staticmethod
    def _notice(exc, name="extensions"):
        print(f"*** heidi: could not compile {name} ({exc}); using the pure-Python twins",
              file=sys.stderr)


def extensions():
    if NO_EXTENSIONS:
        print("*** heidi: HEIDI_NO_EXTENSIONS set: building pure-Python twins only", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("*** heidi: Cython not available: building pure-Python twins only", file=sys.stderr)
        return []
    sources = sorted(glob.glob("heidi/_fast/_*_c.pyx"))
    print(f"*** heidi: compiling {len(sources)} Cython modules", file=sys.stderr)
    return cythonize(sources, language_level=3, compiler_directives={"boundscheck": False,
                                                                        "wraparound": False})


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
