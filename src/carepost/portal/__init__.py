"""Secure pickup of encrypted messages (the portal at ``/p``)."""
