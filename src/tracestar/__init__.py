"""tracestar: which training documents made this language model say that? (TrackStar, arXiv 2410.17413)."""

__version__ = "0.1.0"
