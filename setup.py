from setuptools import find_packages, setup

setup(
    name="xbarsim",
    version="0.1.0",
    description="Simulator of analog in-memory computing on memristive crossbars",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["crossbar", "crossbar.*", "mapping", "mapping.*", "eval", "eval.*"]),
    package_data={"crossbar.devices": ["tables/*.csv"]},
    install_requires=[
        "numpy>=1.24",
        "numba>=0.58",
        "torch>=2.3",  # torch.backends.mha (fused fast paths switched off in converted models)
        "scipy>=1.10",
        "matplotlib>=3.6",
        "scikit-learn>=1.2",
        "tqdm>=4.60",
        "tomli>=2.0; python_version<'3.11'",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "distributed": ["distributed>=2023.1"],
    },
    entry_points={"console_scripts": ["xbarsim=eval.cli:main"]},
)
