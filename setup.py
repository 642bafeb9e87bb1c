"""Install r1vl (the trainer) and r1vl_kernels (the fused GRPO kernels, importable alone).

`kernels/` installs as the import package `r1vl_kernels`, which needs torch and triton only,
so that other GRPO codebases can take the kernels without the trainer's dependencies.
"""
from setuptools import setup

setup(
    name="r1vl",
    version="0.1.0",
    description="StepGRPO (R1-VL) trainer for Qwen2-VL with fused Triton GRPO kernels",
    python_requires=">=3.10",
    packages=["r1vl_kernels", "r1vl"],
    package_dir={"r1vl_kernels": "kernels", "r1vl": "r1vl"},
    install_requires=["torch>=2.5", "triton>=3.1"],
    extras_require={
        "train": [
            "transformers>=5.0", "tokenizers", "safetensors", "pillow", "math-verify",
            "numpy", "pyyaml", "tqdm", "psutil",
        ],
        "deepspeed": ["deepspeed"],
        "flash-attn": ["flash-attn"],
        "bench": ["liger-kernel", "pytest-benchmark"],
    },
)
