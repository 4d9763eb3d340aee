"""wsiseg: tissue-class segmentation of H&E whole-slide images and tumour-stroma ratio."""

__version__ = "0.1.0"
