"""nnunet-ape: anatomically localized CT segmentation for nnU-Net v2."""

from setuptools import find_packages, setup

setup(
    name="nnunet-ape",
    version="0.1.0",
    description="Anatomical Positional Embeddings and Body Part Regression for nnU-Net v2: localize organs, crop, segment",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_ape", "nnunet_ape.*"]),
    install_requires=[
        "nnunetv2>=2.8,<2.9",  # nnUNet_extTrainer (2.8); the internals of nnunet_ape.nnunet were read from 2.8.1
        "torch>=2.1",  # pip chooses the build; do not pin a CPU-only wheel (breaks timm/torchvision)
        "SimpleITK>=2.2",
        "numpy",
        "scipy",
        "matplotlib",
        "tqdm",
        "batchgenerators",
        "acvl_utils",
        "blosc2",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["nnunet-ape=nnunet_ape.cli.main:main"]},
)
