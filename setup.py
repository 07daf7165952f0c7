"""Builds seqkern._C: the C++ CPU kernels always, the CUDA kernels when asked for.

Knobs (never decided by probing for a GPU):
  SEQKERN_SKIP_CUDA_BUILD=1  never compile CUDA sources
  FORCE_CUDA=1               compile CUDA sources even if torch.cuda is unavailable
  SEQKERN_CUDA_ARCHS="80;90a" CUDA architectures (default: 80;90a)
  MAX_JOBS=N                 parallel compile jobs (honoured by torch's ninja builder)
  DEBUG=1                    -O0 -g
  SEQKERN_NO_EXTENSION=1     install the Python package only, compile nothing (a GPU run
                             that brings a _C built elsewhere: bench/gpu_check.sh)

seqkern._C uses CPython's stable ABI only (it is an empty module whose loading registers the
kernels with torch's dispatcher), so it is built as _C.abi3.so (py_limited_api): one build
loads under every CPython >= 3.9 beside the same torch, e.g. one made here for the GPU
machine's Python 3.12 (`make gpu-torch-check`).
"""
import glob
import os
import platform

from setuptools import find_packages, setup

def _capability_flags():
    """{unit: flags} of the per-capability kernel units (csrc/cpu/capability/flags.txt)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu",
                        "capability", "flags.txt")
    with open(path) as f:
        lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return {words[0]: words[1:] for words in lines}


CAPABILITY_FLAGS = _capability_flags()
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs serially.
    cxx += ["-std=c++17", "-fopenmp"]
    # The per-capability kernel units come last, the baseline one first among them: inline
    # functions they share with the rest are then taken from baseline-compiled code.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + [
        f"csrc/cpu/capability/{name}.cpp" for name in ("default", "avx2", "avx512")]

    build_cuda = (not _flag("SEQKERN_SKIP_CUDA_BUILD")) and (
        _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    define_macros = [("SEQKERN_BUILD_CPU_FLAGS", '"' + " ".join(cxx) + '"')]
    if build_cuda and cuda_sources:
        archs = os.environ.get("SEQKERN_CUDA_ARCHS", "80;90a").split(";")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        for arch in archs:
            nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        define_macros += [("SEQKERN_WITH_CUDA", "1"),
                          ("SEQKERN_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
        return [CUDAExtension(
            "seqkern._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
            define_macros=define_macros, py_limited_api=True)]
    return [CppExtension("seqkern._C", sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"],
                         define_macros=define_macros, py_limited_api=True)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithCapabilityFlags(BuildExtension):
        """setuptools gives an extension one set of flags: the capability units are compiled
        first, each with its CAPABILITY_FLAGS, and linked after the other objects (so the
        baseline unit's copies of shared inline functions are the ones the linker keeps)."""

        def build_extension(self, ext):
            own_flags = {src: CAPABILITY_FLAGS[name] for src in ext.sources
                         for name in CAPABILITY_FLAGS
                         if X86_64 and src.endswith(f"capability/{name}.cpp")}
            objects = []
            for src, flags in own_flags.items():
                args = dict(ext.extra_compile_args, cxx=ext.extra_compile_args["cxx"] + flags)
                objects += self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args,
                    depends=ext.depends)
            ext.sources = [src for src in ext.sources if src not in own_flags]
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return {"build_ext": BuildWithCapabilityFlags.with_options(use_ninja=True)}


setup(
    name="seqkern",
    version="0.1.0",
    description="Fused attention and recurrent kernels for PyTorch (Triton, C++, CUDA)",
    packages=sorted(set(find_packages(include=["seqkern", "seqkern.*"])) | {"seqkern.kernels"}),
    package_dir={"seqkern": "seqkern", "seqkern.kernels": "kernels"},
    ext_modules=[] if _flag("SEQKERN_NO_EXTENSION") else _extensions(),
    cmdclass=_cmdclass(),
    python_requires=">=3.10",
)
