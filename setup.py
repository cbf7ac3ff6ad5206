"""Builds the optional C++/CUDA operator library `vllm_dllm_spec._C`.

The CPU implementation is always built when torch is importable at build time (install with
`--no-build-isolation` so the venv's torch is used). The CUDA implementation is added only when
nvcc and a CUDA build of torch are both present. Without torch the package still installs and
falls back to the PyTorch `*_ref` twins in `vllm_dllm_spec.ops`.
"""
import glob
import os
import shutil

from setuptools import setup


def _extensions():
    if os.environ.get("DLLM_SPEC_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))
        and os.environ.get("DLLM_SPEC_NO_CUDA") != "1"
    )
    cxx = ["-O3", "-std=c++17"]
    if want_cuda:
        ext = CUDAExtension(
            "vllm_dllm_spec._C",
            sources + cuda_sources,
            define_macros=[("DLLM_SPEC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        ext = CppExtension("vllm_dllm_spec._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
