"""skinray: a six-class skin-lesion ensemble with Grad-CAM. This package needs no Ray."""
__version__ = "0.1.0"
