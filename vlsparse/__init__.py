"""vlsparse: find lottery tickets in vision-and-language transformers and ship them as sparse models.

Implements "Playing Lottery Tickets with Vision and Language" (Gan et al., AAAI 2022).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # vlsparse.Pipeline, imported on first use (it needs no torch; importing vlsparse stays cheap)
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
