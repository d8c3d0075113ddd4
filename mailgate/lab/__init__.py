"""Interop lab tooling: wire transcripts, fault injection and the conformance probe.

Everything here wraps a protocol factory from the outside (the composition root applies it);
the POP3 and SMTP protocols know nothing about the lab.
"""
