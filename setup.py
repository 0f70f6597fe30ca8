from setuptools import find_packages, setup

setup(
    name="srft_mcore",
    version="0.1.0",
    description="Megatron-Core trainer for SRFT: single-stage supervised + reinforcement fine-tuning",
    packages=find_packages(include=["srft_mcore", "srft_mcore.*", "tools", "tools.*"]),
    package_data={"srft_mcore": ["assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "psutil",
        "transformers",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "train": ["datasets", "math-verify", "matplotlib", "tensorboard"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "srft-doctor=srft_mcore.doctor.cli:main",
            "srft-train=srft_mcore.training.cli:main",
            "srft-plot=srft_mcore.training.plot:main",
            "srft-convert=tools.convert_ckpt.cli:main",
            "srft-eval=srft_mcore.evaluation.cli:main",
            "srft-plan=srft_mcore.planning.cli:main",
            "srft-compare=srft_mcore.comparison.cli:main",
        ],
    },
)
