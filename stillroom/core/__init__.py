"""Core: knows no particular method, exporter or runtime (plugins, export and serve build on it)."""
