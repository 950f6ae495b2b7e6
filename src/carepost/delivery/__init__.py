"""Secure delivery: policy, composition, DKIM, PGP, S/MIME, TLS probe and SMTP."""
