"""Deprecated home of :mod:`vlsparse.data.visual.regions` (moved in 0.2; this path goes in the next release)."""

from vlsparse._compat import moved

__getattr__ = moved(__name__, {name: "vlsparse.data.visual.regions" for name in (
    "EXTRACTOR_VERSION", "NUM_REGIONS", "REGION_NAMES", "REGION_FEATURE_DIM", "background_colour",
    "foreground_object", "extract_regions", "load_image", "default_cache_dir", "RegionFeatureCache")})
