"""The web console in a real browser (Debian's chromium through Playwright) against a real server."""
