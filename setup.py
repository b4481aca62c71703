"""Install sra-fast. The top-level kernels/ folder becomes the `sra_fast.kernels` package.

The optional C++/CUDA extension in csrc/ is built only with SRA_FAST_BUILD_EXT=1 (it needs a
CUDA toolkit matching the installed torch); everything runs without it.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SRA_FAST_BUILD_EXT", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    ext_modules = [CUDAExtension(
        "sra_fast._C",
        sources=["csrc/bindings.cpp", "csrc/fused_ema.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )]
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
    extras_require={"test": ["pytest", "pytest-timeout"], "vae": ["diffusers"],
                    "log": ["tensorboard"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
