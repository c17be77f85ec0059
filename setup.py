"""Build the waveclip packages and the `waveclip_kernels._C` extension.

The C++ (OpenMP) extension is always built. Its CUDA kernels are added when torch is a CUDA build
and CUDA_HOME is set, e.g.

    CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 pip install -e . --no-build-isolation

With torch's CUDA wheels the cuBLAS/cuSPARSE headers live in site-packages/nvidia/cu13/include;
that folder is added automatically. WAVECLIP_CUDA=0 forces a CPU-only build, WAVECLIP_CUDA=1
insists on CUDA (an error if it cannot), and WAVECLIP_NO_EXTENSION=1 skips the extension.
"""

import glob
import os
import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).parent


def cuda_requested(torch) -> bool:
    wanted = os.environ.get("WAVECLIP_CUDA", "auto")
    possible = torch.version.cuda is not None and bool(os.environ.get("CUDA_HOME"))
    if wanted == "1" and not possible:
        raise RuntimeError("WAVECLIP_CUDA=1 needs a CUDA build of torch and CUDA_HOME (e.g. /usr/local/cuda)")
    return possible and wanted != "0"


def extensions():
    if os.environ.get("WAVECLIP_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[str(ROOT / "csrc")])
    if cuda_requested(torch):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cu13 = pathlib.Path(torch.__file__).parent.parent / "nvidia" / "cu13" / "include"
        if cu13.is_dir():
            kwargs["include_dirs"].append(str(cu13))
        ext = cpp_extension.CUDAExtension(
            "waveclip_kernels._C",
            cpp_sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("WAVECLIP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension("waveclip_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
