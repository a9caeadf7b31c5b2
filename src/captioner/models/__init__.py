"""Models: the family registry (`families/`), the one entry point that loads or builds a model
(`build.py`), compositions of pretrained parts, LoRA, tokenizers, precision and ONNX export."""
