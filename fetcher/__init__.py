"""fetcher: run HTTP and mail jobs from a job file at high concurrency, one result line each."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
