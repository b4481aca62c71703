"""Install sra-fast. The top-level kernels/ folder becomes the `sra_fast.kernels` package.

The optional C++/CUDA extension in csrc/ (`sra_fast._C`: a fused multi-tensor EMA update and
the one-pass AdamW + EMA update) is
built only with SRA_FAST_BUILD_EXT=1; a plain `pip install -e .` compiles nothing and
everything runs without it. With the switch on: a CUDAExtension (-DWITH_CUDA, arch list
from TORCH_CUDA_ARCH_LIST, default "9.0") when torch has CUDA and a toolkit is found, else a
CPU-only CppExtension; SRA_FAST_EXT_CUDA=0/1 forces the choice. Alternatives: CMakeLists.txt,
or a JIT build at import with SRA_FAST_JIT_EXT=1 (see csrc/README.md).
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SRA_FAST_BUILD_EXT", "0") == "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("SRA_FAST_EXT_CUDA")
    with_cuda = (force == "1") if force in ("0", "1") else (
        torch.version.cuda is not None and CUDA_HOME is not None)
    sources = ["csrc/bindings.cpp", "csrc/fused_ema_cpu.cpp", "csrc/fused_adamw_ema_cpu.cpp"]
    cuda_sources = ["csrc/fused_ema.cu", "csrc/fused_adamw_ema.cu"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext_modules = [CUDAExtension(
            "sra_fast._C", sources=sources + cuda_sources, include_dirs=["csrc"],
            # no --use_fast_math: it implies -ftz=true; the kernel matches torch bit for bit
            extra_compile_args={"cxx": ["-O3", "-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA"]},
        )]
    else:
        ext_modules = [CppExtension("sra_fast._C", sources=sources, include_dirs=["csrc"],
                                    extra_compile_args=["-O3"])]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="sra-fast",
    version="0.1.0",
    description="Fast, exact SiT/DiT training with Self-Representation Alignment",
    python_requires=">=3.10",
    packages=["sra_fast", "sra_fast.ops", "sra_fast.models", "sra_fast.objective",
              "sra_fast.kernels"],
    package_dir={"sra_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "pillow",
        "scikit-learn",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "nvtx; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "diffusers", "tensorboard"], "vae": ["diffusers"],
                    "log": ["tensorboard"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
