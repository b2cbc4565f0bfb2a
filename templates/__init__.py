"""Jinja2 templates, stylesheet and bundled font of the audit report (package data)."""
