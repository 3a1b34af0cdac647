"""CloudEvents 1.0 over HTTP, through the CloudEvents SDK: read (binary and structured) and written."""
