"""rfpn: recurrent vision models trained in constant memory (C-RBP), as a Detectron2 extension."""
from setuptools import find_packages, setup

setup(
    name="rfpn",
    version="0.1.0",
    description="Recurrent FPN and Pathfinder with contractor recurrent back-propagation (C-RBP) for Detectron2",
    python_requires=">=3.10",
    packages=find_packages(include=["rfpn", "rfpn.*"]),
    package_data={"rfpn.model_zoo": ["trained.json", "weights/**/*.pth"]},
    install_requires=["torch", "torchvision", "numpy<2", "opencv-python-headless", "pycocotools", "matplotlib", "scipy"],
)
