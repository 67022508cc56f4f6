"""Omniglot reading, the one preprocessing function, and episode sampling."""
