"""cv-worker: an edge agent that turns a small Linux box into a computer-vision worker node controlled over MQTT."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = (HERE / "agent" / "VERSION").read_text().strip()

setup(
    name="cv-worker",
    version=VERSION,
    description="Edge computer-vision worker node controlled over MQTT",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["agent*", "accelerators*", "models*", "provisioning*"]),
    package_data={"agent": ["VERSION"], "agent.httpapi": ["static/*"]},
    install_requires=[
        "paho-mqtt>=2.1,<3",
        "pydantic>=2.6,<3",
        "pydantic-settings>=2.3,<3",
        "tomli>=2.0; python_version<'3.11'",
        "tinydb>=4.8,<5",
        "zeroconf>=0.132",
        "requests>=2.31",
        "opencv-python-headless>=4.8",
        "numpy>=1.24",
        "rich>=13",
        # The local HTTP API and web console (agent/httpapi/); imported only when [http] is enabled.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "openvino": ["openvino>=2024.0"],
        "tflite": ["ai-edge-litert>=1.0; platform_machine!='armv7l'"],
        "camera": ["picamera2>=0.3.17; platform_machine=='aarch64' or platform_machine=='armv7l'"],
        "systemd": ["systemd-python>=235"],
        # The build-system peer (`cv-worker trainer`): torch pinned (an unpinned torch pulls GBs of CUDA wheels),
        # onnx for torch.onnx.export(dynamo=False), openvino to write the IR the nodes run.
        "train": ["torch==2.13.0", "onnx>=1.16", "openvino>=2024.0"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.5",
            "cryptography>=42",
            "scikit-image>=0.22",
            "scikit-learn>=1.3",
            "py-spy>=0.3",
            "schemathesis>=4,<5",
            "selenium>=4.20",
        ],
    },
    entry_points={
        "console_scripts": ["cv-worker = agent.cli:main"],
        # Trainer plugins of build peers (docs/training.md); third-party packages add their own.
        "cv_worker.trainer_plugins": ["classifier = agent.trainer.classifier:ClassifierPlugin"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
