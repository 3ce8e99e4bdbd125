"""bnrhn: recurrent sequence generators, with the Batch-Normalized Recurrent Highway Network captioner as flagship."""

__version__ = "0.1.0"
