"""On-device inference with ONNX Runtime: the base model exported once as a graph whose
inputs carry each row's personalization (:mod:`.graph`, :mod:`.export`), and an engine that
answers with it (:mod:`.runtime`). Light on purpose: importing this package loads neither
torch nor onnxruntime."""

#: How a device or a run answers: PyTorch, or ONNX Runtime on the fp32 graph or on a
#: weight-only quantized one.
BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-int4")
