"""Packaging: metadata in setup.cfg. The top-level ``properties/`` folder (the YAML defaults, kept at the
repository root like RecBole's) ships inside the package as ``recbole_ilora/properties``."""

from setuptools import find_packages, setup

PROPERTIES = ["recbole_ilora.properties", "recbole_ilora.properties.model", "recbole_ilora.properties.dataset"]

setup(
    packages=find_packages(include=["recbole_ilora", "recbole_ilora.*"]) + PROPERTIES,
    package_dir={package: package.replace("recbole_ilora.properties", "properties").replace(".", "/")
                 for package in PROPERTIES},
    package_data={package: ["*.yaml"] for package in PROPERTIES},
)
