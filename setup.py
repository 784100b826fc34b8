"""x2v: compiled-engine export and runtime for Wan2.1 video generation.

The top-level folders are installed as subpackages of one `x2v` namespace, so `import x2v.export` works
after `pip install .` while the repository keeps the flat layout users browse.
"""

import re
from pathlib import Path

from setuptools import setup

SUBPACKAGES = ["export", "runtime", "plugins", "calibration", "configs"]
INIT = (Path(__file__).parent / "runtime" / "__init__.py").read_text()
VERSION = re.search(r'__version__ = "([^"]+)"', INIT)[1]  # one value: runtime/__init__.py

setup(
    name="x2v",
    version=VERSION,
    description="Export Wan2.1 to per-GPU engines (FP8, SageAttention) and run them in a lean runtime",
    python_requires=">=3.10",
    packages=[f"x2v.{p}" for p in SUBPACKAGES],
    package_dir={f"x2v.{p}": p for p in SUBPACKAGES},
    package_data={
        "x2v.configs": ["models/*.yaml", "gpus/*.yaml", "teacache/*.yaml", "example.png"],
        "x2v.calibration": ["sets/*.yaml"],
    },
    install_requires=[
        "torch>=2.5",
        "safetensors>=0.4",
        "pyyaml>=6",
        "click>=8",
        "tqdm>=4",
        "numpy>=1.24",
        "pillow>=10",
        "tokenizers>=0.15",
        "av>=12",
    ],
    extras_require={
        # ONNX export and the CPU (ONNX Runtime) engines; ModelOpt for calibration and FP8 PTQ
        "export": ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20", "nvidia-modelopt>=0.40"],
        "test": [
            "pytest>=8",
            "diffusers>=0.32",
            "ruff>=0.6",
            "onnx>=1.17",
            "onnxscript>=0.3",
            "onnxruntime>=1.20",
            "nvidia-modelopt>=0.40",
            # the SageAttention kernels run in Triton's CPU interpreter (the GPU image's Triton version)
            "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],  # fmt: skip
    },
    entry_points={
        "console_scripts": [
            "x2v-export=x2v.export.cli:main",
            "x2v=x2v.runtime.cli:main",
        ]
    },
)
