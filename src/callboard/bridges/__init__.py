"""Bridges: modules that copy events between callboard's broker and outside systems."""
