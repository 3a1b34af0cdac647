"""Helpers for testing code that uses callboard."""

from callboard.testing.recording import FAST_RETRY, RecordingEventsService, SubscribeCall

__all__ = ["FAST_RETRY", "RecordingEventsService", "SubscribeCall"]
