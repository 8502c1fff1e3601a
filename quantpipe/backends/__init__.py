"""Backends: builders that make artifacts (quantized models, engines) and runners that execute them."""
