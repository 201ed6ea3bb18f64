"""moekit: make Mixture-of-Experts language models smaller, faster and better understood."""

__version__ = "0.1.0"
