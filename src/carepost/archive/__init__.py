"""The message archive (issue 16 item 8): every message sent stays retrievable, encrypted, for its
retention period; searchable by metadata and by keyed word tokens (never by clear text); production
exports (EML, MBOX, manifest, chain of custody) for legal discovery or a patient's request."""
