"""The serving side: a FastAPI session service over the ``models`` package."""
