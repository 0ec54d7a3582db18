"""The package version: a leaf module, so that the model can name it without importing the
package's ``__init__`` (which imports nothing eagerly, but sits above everything)."""

__version__ = "0.1.0"
