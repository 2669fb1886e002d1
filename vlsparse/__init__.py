"""vlsparse: find lottery tickets in vision-and-language transformers and ship them as sparse models.

Implements "Playing Lottery Tickets with Vision and Language" (Gan et al., AAAI 2022).
"""

__version__ = "0.1.0"
