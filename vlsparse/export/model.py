"""Deprecated home of whole-model export and loading (moved in 0.2; this path goes in the next release).

Export: :mod:`vlsparse.export.exporters`; loading a CSR export: :func:`vlsparse.load_sparse`
(:mod:`vlsparse.runtime.load`).
"""

from vlsparse._compat import moved

__getattr__ = moved(__name__, {
    **{name: "vlsparse.export.exporters" for name in (
        "export_csr", "export_onnx", "masked_copy", "model_from_weights", "save_onnx", "ONNX_FILE", "LAYOUTS",
        "DTYPES")},
    **{name: "vlsparse.runtime.load" for name in ("load_sparse", "ExportError", "FORMAT")}})
