"""Sending spooled mail to the next hop: an SMTP client, smarthost or MX routing."""
