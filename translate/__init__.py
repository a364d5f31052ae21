"""translate: unpaired image-to-image translation and GAN baselines on one adversarial core."""

import os

# albumentations checks PyPI for updates on import; nothing in this package touches the network,
# so the switch is forced on, even over a NO_ALBUMENTATIONS_UPDATE=0 inherited from the shell.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

from translate.version import __version__  # noqa: F401 (after the switch above)

__all__ = ["export_run", "import_reference", "load_config", "load_generator", "train",
           "translate_folder"]


def __getattr__(name: str):
    # The public API, imported on first use so `import translate` stays light.
    if name == "load_generator":
        from translate.infer import load_generator

        return load_generator
    if name == "export_run":
        from translate.export import export_run

        return export_run
    if name == "import_reference":
        from translate.reference import import_reference

        return import_reference
    if name == "translate_folder":
        from translate.infer import translate_folder

        return translate_folder
    if name == "train":
        from translate.runner import train

        return train
    if name == "load_config":
        from translate.recipe import load

        return load
    raise AttributeError(f"module 'translate' has no attribute {name!r}")
