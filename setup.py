"""Builds glm5v_kernels._host, the pybind11 C++17 extension for the data pipeline's hot paths.

Sources are compiled with ninja (parallel and incremental) when it is on PATH or installed as the
`ninja` Python package, with setuptools' own compiler loop otherwise. A built package (wheel or
non-editable install) also carries the CUDA sources that glm5v_kernels compiles at run time
(NVRTC), as glm5v_kernels/_csrc/{cuda,common}/; an editable install reads them from csrc/.
"""

import os
import shutil
import subprocess
from functools import partial
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

RUNTIME_SOURCES = ("csrc/cuda/*.cu", "csrc/common/*.h")  # compiled by NVRTC when a kernel first runs


def _find_ninja():
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    return os.path.join(ninja.BIN_DIR, "ninja")


def _ninja_compile(compiler, ninja, build_dir, sources, output_dir=None, macros=None, include_dirs=None,
                   debug=0, extra_preargs=None, extra_postargs=None, depends=None):
    """Drop-in for CCompiler.compile that writes a build.ninja and runs it."""
    macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
    command = " ".join(map(_quote, [*compiler.compiler_so, *cc_args, *extra_postargs]))
    lines = [
        f"builddir = {_escape(os.path.abspath(build_dir))}",
        "rule cxx",
        f"  command = {command} -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = compile $in",
    ]
    for obj, (src, _ext) in build.items():
        lines.append(f"build {_escape(os.path.abspath(obj))}: cxx {_escape(os.path.abspath(src))}")
    os.makedirs(build_dir, exist_ok=True)
    ninja_file = os.path.join(build_dir, "build.ninja")
    with open(ninja_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    subprocess.run([ninja, "-f", ninja_file], check=True)
    return objects


def _quote(arg):
    return arg if arg and all(c.isalnum() or c in "-_=./+:," for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def _escape(path):
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    def build_extensions(self):
        ninja = _find_ninja()
        if ninja and self.compiler.compiler_type == "unix":
            self.compiler.compile = partial(_ninja_compile, self.compiler, ninja, self.build_temp)
        super().build_extensions()


class BuildPyWithRuntimeSources(build_py):
    def run(self):
        super().run()
        for pattern in RUNTIME_SOURCES:
            for source in sorted(glob(pattern)):
                relative = os.path.relpath(source, "csrc")
                target = os.path.join(self.build_lib, "glm5v_kernels", "_csrc", relative)
                self.mkpath(os.path.dirname(target))
                self.copy_file(source, target)


host = Pybind11Extension(
    "glm5v_kernels._host",
    sorted(glob("csrc/host/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-pthread", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
    depends=sorted(glob("csrc/host/*.h") + glob("csrc/common/*.h")),
)

setup(ext_modules=[host], cmdclass={"build_ext": NinjaBuildExt, "build_py": BuildPyWithRuntimeSources})
