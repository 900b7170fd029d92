"""Build esper_fast._C: a CUDAExtension when a CUDA torch and nvcc are present, else C++ only.

ESPER_FAST_CUDA=1 forces the CUDA build (and fails if it cannot be done), ESPER_FAST_CUDA=0
forces the CPU-only build. The decision is made at build time from torch.version.cuda and
the toolkit on disk, never from torch.cuda.is_available(): build machines often have no GPU.
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"


def _has_cudart(root):
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    return any(glob.glob(os.path.join(root, p)) for p in patterns)


def _find_cuda_home():
    """A toolkit root with bin/nvcc and libcudart: env first, then nvcc on PATH, then /usr/local/cuda.

    nvcc on PATH may be a wrapper script (not a symlink), in which case its parent is not the
    toolkit; such candidates are skipped because they have no libcudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return os.path.realpath(root)
    return None


def _want_cuda(cuda_home):
    import torch

    forced = os.environ.get("ESPER_FAST_CUDA", "").strip()
    possible = torch.version.cuda is not None and cuda_home is not None
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            raise RuntimeError(
                f"ESPER_FAST_CUDA=1 but a CUDA build is impossible: torch.version.cuda="
                f"{torch.version.cuda!r}, CUDA toolkit found at {cuda_home!r}"
            )
        return True
    return possible


cuda_home = _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = _want_cuda(cuda_home)
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard it needs
# No --use_fast_math: it compiles every float32 op with .ftz, flushing denormals (argmax of
# [0, 1e-40] became 0, lerp at alpha 0 lost denormal hosts). Fast intrinsics are spelled out
# where they are meant (__expf in csrc/cuda/metrics.cu); tests/test_build.py checks the PTX.
nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
define_macros = []
include_dirs = [os.path.join(HERE, "csrc")]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("ESPER_FAST_WITH_CUDA", "1"))
    # A minimal toolkit may lack the library headers some ATen CUDA headers include;
    # torch's own CUDA wheels ship them.
    for pkg in ("cu13", "cu12", "cuda_runtime", "cusparse", "cublas"):
        for inc in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", pkg, "include")):
            include_dirs.append(os.path.realpath(inc))
    extension = CUDAExtension(
        "esper_fast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "esper_fast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

print(f"esper_fast: building {'CUDA + CPU' if with_cuda else 'CPU-only'} extension "
      f"(torch {torch.__version__}, CUDA_HOME={cuda_home}, "
      f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'})")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
