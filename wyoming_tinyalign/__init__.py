"""wyoming-tinyalign: a local speech-LLM voice assistant for Home Assistant."""

__version__ = "0.1.0"
