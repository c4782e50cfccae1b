"""Admission and limits (glossary: see below)."""
