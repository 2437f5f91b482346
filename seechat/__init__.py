"""seechat: Chinese multimodal chat models from a vision encoder, a bridge and a Chinese LLM."""

__version__ = "0.1.0"
