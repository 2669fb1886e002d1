"""What an app loads: bundles, sparse models, onnxruntime sessions with our op, one Runner per format and the Pipeline. Never imports export code; the ONNX path needs no torch."""
