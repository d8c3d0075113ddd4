"""The outbound path: durable spool, queue runner with retries, DSN bounces, admin commands."""
