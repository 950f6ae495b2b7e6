"""CarePost: HIPAA-compliant email for healthcare providers, payers and suppliers."""

__version__ = "0.1.0"
