"""Evaluators for rfpn's tasks."""
