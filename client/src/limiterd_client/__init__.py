"""limiterd's Python client."""
