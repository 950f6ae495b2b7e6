"""Queue tasks of the ``ehr`` capability.

None yet: the MLLP listener stores and answers each message itself (an ACK must mean the message
is stored), FHIR resources are recorded in their request, and retrying the error queue is an API
or CLI action. The module exists so the composition root lists every capability the same way.
"""
