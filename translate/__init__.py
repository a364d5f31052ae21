"""translate: unpaired image-to-image translation and GAN baselines on one adversarial core."""

import os

# albumentations checks PyPI for updates on import; nothing in this package touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
