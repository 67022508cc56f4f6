"""Session records, label slots and the stores that keep them."""
