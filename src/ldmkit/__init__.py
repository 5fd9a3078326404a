"""ldmkit: a readable text-to-image latent diffusion toolkit with classifier-free guidance."""

__version__ = "0.2.0"
__all__ = ["Config", "TextToImagePipeline", "__version__", "load_config"]


def __getattr__(name: str):
    # Lazy, so `import ldmkit` and `ldmkit --help` don't pay for torch + transformers.
    if name == "TextToImagePipeline":
        from ldmkit.pipeline import TextToImagePipeline

        return TextToImagePipeline
    if name in ("Config", "load_config"):
        from ldmkit import config

        return getattr(config, name)
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
