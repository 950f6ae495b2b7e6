"""Events in from clinical systems (issue 15 item 3): HL7 v2 ADT and SIU over MLLP, FHIR R4
Appointment and Encounter, mapped to contact events recorded through tracking."""
