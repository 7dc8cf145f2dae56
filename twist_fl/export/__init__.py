"""Models out of twist-fl: Hugging Face transformers folders (`hf`) and ONNX Runtime models,
fp32 or int8 (`onnx`)."""
