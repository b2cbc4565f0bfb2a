"""Saliency methods. FullGrad lives in :mod:`saliaudit.methods.fullgrad`."""
