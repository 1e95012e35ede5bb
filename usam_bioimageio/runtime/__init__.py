"""Running packages: loading and verifying packages and families, the backends (ONNX Runtime, torchscript), the model handle, SAM's geometry in numpy."""
