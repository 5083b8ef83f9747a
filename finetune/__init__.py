"""Fine-tune Qwen2-VL and Qwen2.5-VL on image and video question answering."""

__version__ = "0.1.0"
