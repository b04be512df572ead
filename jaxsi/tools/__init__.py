"""Operator tools that run before or beside training (e.g. `python -m jaxsi.tools.aot`)."""
